"""Allows `python -m transferkit`."""

from transferkit.cli.app import main

main()
