SELECT 'a' AS x; -- a comment; SELECT 'not run'
SELECT 'b' AS x -- trailing; comment
;SELECT 'c' AS x --