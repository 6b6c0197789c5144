SELECT 'a'
'b' AS x; SELECT 'c'   
   'd;' AS x; SELECT E'e'
'\'f;' AS x; SELECT 'g' AS x