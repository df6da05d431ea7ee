from ftlib.cli import entrypoint

entrypoint()
