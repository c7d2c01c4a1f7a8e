-- Run by the postgres container at first start (docker-compose.yml): the
-- role and database that the demo and the tests use, as scripts/stack
-- creates them locally, and the demo tables, owned by that role (it creates
-- the publication, which needs ownership).
CREATE ROLE unilog LOGIN REPLICATION PASSWORD 'unilog';
CREATE DATABASE unilog_demo OWNER unilog;
\connect unilog_demo unilog
\i /unilog-demo/schema.sql
