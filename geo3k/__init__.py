"""The `geo3k` command line (cli.py) and the tools behind `geo3k inspect` (inspect/).

The stages themselves live in preprocess/ and train/, what both use in shared/; this package may import all
three, none of them imports it.
"""
