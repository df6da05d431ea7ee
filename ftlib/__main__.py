from ftlib.cli import run

run()
