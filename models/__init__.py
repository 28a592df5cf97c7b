"""Pydantic records and configuration: the single source of truth for Parquet schemas and config."""
