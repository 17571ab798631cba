#!/bin/sh
# Run once by the postgres image on an empty volume. The platform's own role owns its database but is
# no superuser and cannot bypass row-level security, so the policies on every tenant table bind it.
set -eu
psql -v ON_ERROR_STOP=1 -v password="$POSTGRES_PASSWORD" --username "$POSTGRES_USER" --dbname postgres <<'SQL'
CREATE ROLE plinth LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD :'password';
CREATE DATABASE plinth OWNER plinth;
SQL
