-- pgbench script: ten point selects in one pipeline (libpq pipeline mode: Parse/Bind/Execute
-- for each, one Sync at the end), as psycopg's pipeline mode sends them. Needs -M extended or
-- -M prepared.
\set a1 random(1, 100000 * :scale)
\set a2 random(1, 100000 * :scale)
\set a3 random(1, 100000 * :scale)
\set a4 random(1, 100000 * :scale)
\set a5 random(1, 100000 * :scale)
\set a6 random(1, 100000 * :scale)
\set a7 random(1, 100000 * :scale)
\set a8 random(1, 100000 * :scale)
\set a9 random(1, 100000 * :scale)
\set a10 random(1, 100000 * :scale)
\startpipeline
SELECT abalance FROM pgbench_accounts WHERE aid = :a1;
SELECT abalance FROM pgbench_accounts WHERE aid = :a2;
SELECT abalance FROM pgbench_accounts WHERE aid = :a3;
SELECT abalance FROM pgbench_accounts WHERE aid = :a4;
SELECT abalance FROM pgbench_accounts WHERE aid = :a5;
SELECT abalance FROM pgbench_accounts WHERE aid = :a6;
SELECT abalance FROM pgbench_accounts WHERE aid = :a7;
SELECT abalance FROM pgbench_accounts WHERE aid = :a8;
SELECT abalance FROM pgbench_accounts WHERE aid = :a9;
SELECT abalance FROM pgbench_accounts WHERE aid = :a10;
\endpipeline
