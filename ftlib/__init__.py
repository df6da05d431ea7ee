"""ftlib: fine-tune Llama-3-style models through an Airflow/DVC/MLflow pipeline.

One module per pipeline stage (validate, split, ...); `ftlib.cli` maps each
subcommand onto the stage function. Importing ftlib is light: heavy libraries
(torch, transformers, great_expectations) load inside the functions that need them,
so Airflow can parse DAGs that import ftlib quickly.
"""

__version__ = "0.1.0"
