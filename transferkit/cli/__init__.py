"""The edge: the Typer app (app.py), the options generated from the configs (options.py),
the cheap checks before TensorFlow (prechecks.py) and the terminal output (console.py): the
only package that imports typer and rich."""

from transferkit.cli.app import app, main

__all__ = ["app", "main"]
