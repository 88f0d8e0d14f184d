"""CLI subcommands, one module each (see :mod:`flowprune.cli`)."""
