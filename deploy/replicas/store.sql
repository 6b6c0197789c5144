-- The shared store: run once as a superuser on the store's PostgreSQL (not a target's).
-- jitgate creates and migrates its tables itself at start (numbered migrations under an
-- advisory lock, so the three replicas may start together).
--   psql -h store.internal -U postgres -v pw="'...'" -f store.sql
CREATE ROLE jitgate LOGIN PASSWORD :pw;
CREATE DATABASE jitgate OWNER jitgate;
-- Only jitgate's role may connect to it.
REVOKE CONNECT ON DATABASE jitgate FROM PUBLIC;
