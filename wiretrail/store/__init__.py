"""The store: capture files + packet index (packets), Parquet tables + DuckDB (metadata)."""
