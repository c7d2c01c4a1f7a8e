-- Run by the postgres container at first start (docker-compose.yml): the
-- role and database that the demo and the tests use, as scripts/stack
-- creates them locally.
CREATE ROLE unilog LOGIN REPLICATION PASSWORD 'unilog';
CREATE DATABASE unilog_demo OWNER unilog;
