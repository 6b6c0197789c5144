 /* -- */ SELECT 1 AS n; -- /*
SELECT 2 AS n; /* /* -- */ */ SELECT 3 AS n