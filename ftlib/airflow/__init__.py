"""Face: Airflow glue (DAG params -> overrides, the GPU pod spec, DVC-or-direct decisions, assets).
Installed with the `[airflow]` extra; the dags/ files import it, nothing in ftlib does."""
