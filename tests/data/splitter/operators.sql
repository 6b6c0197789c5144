SELECT 1 +-2 AS x; SELECT 2 *-- comment ;
 3 AS x; SELECT 4 /*/ ; */ AS x; SELECT 5 */* ; */ 2 AS x; SELECT 6 -/**/-1 AS x; SELECT 7 <-- ;
 8 AS x