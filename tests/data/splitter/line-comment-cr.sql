SELECT 1 AS x -- a comment ended by a carriage return; SELECT 2 AS x -- and \r\n
; SELECT 3 AS x