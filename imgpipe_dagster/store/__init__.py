"""PostgreSQL side of the engine (no Dagster): the embedded server, connections, migrations, writers."""
