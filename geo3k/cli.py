"""The `geo3k` command. This file only wires the subcommands: each lives in geo3k/commands/ (one file per
command), its work in its stage's package.

    geo3k --help            (or: python -m geo3k --help)

Errors that a user can fix print one line saying how, without a traceback; set GEO3K_DEBUG=1 for one.
"""

from __future__ import annotations

import os
import sys

import typer

from geo3k.commands.demo_data import demo_data
from geo3k.commands.eval import eval_
from geo3k.commands.export import export
from geo3k.commands.inspect import inspect_
from geo3k.commands.preprocess import preprocess
from geo3k.commands.train import train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    help="Fine-tune Qwen vision-language models on Geo3K: preprocess once into shards, train many times.",
)
app.command()(preprocess)
app.command("demo-data")(demo_data)
app.command("inspect")(inspect_)
app.command()(train)
app.command()(export)
app.command("eval")(eval_)


def main() -> None:
    from shared.errors import UserError

    try:
        app()
    except UserError as e:
        if os.environ.get("GEO3K_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
