"""The ``transferlab`` command line: flags generated from the config fields, one module per command family."""

from transferlab.cli.main import main

__all__ = ["main"]
