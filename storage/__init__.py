"""Parquet shards (atomic writes) and the DuckDB catalog (one writer: the flow process)."""
