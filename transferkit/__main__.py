"""Allows `python -m transferkit`."""

from transferkit.cli import main

main()
