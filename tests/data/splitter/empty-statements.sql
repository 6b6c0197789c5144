;;SELECT 1 AS x;;; ;SELECT 2 AS x;  ;
; SELECT 3 AS x; -- done
 /* the end ; */   
