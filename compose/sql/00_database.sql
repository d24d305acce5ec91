-- The one database of the CI job telemetry stack.
-- Every statement in compose/sql/ is idempotent and fully qualified with `otel`.
-- The files run in lexical order, in the embedded stack (split into statements
-- on a `;` at the end of a line, each POSTed to chdb-http) and in the Docker
-- stack (clickhouse-server's /docker-entrypoint-initdb.d).
CREATE DATABASE IF NOT EXISTS otel;
