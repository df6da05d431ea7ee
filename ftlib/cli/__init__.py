"""Face: the `ftlib` command. Each subcommand parses its options, calls one function of a lower
layer and prints the result (ftlib/cli/main.py). Nothing in the package imports it but `python -m ftlib`."""

from ftlib.cli.main import app, entrypoint

__all__ = ["app", "entrypoint"]
