"""The `geo3k` subcommands, one module each; geo3k/cli.py wires them into one command."""
