-- MLflow's backend store (runs, metrics, the model registry) beside Airflow's DB in the same Postgres.
-- The postgres image runs this once, when it initialises an empty data volume.
CREATE DATABASE mlflow;
