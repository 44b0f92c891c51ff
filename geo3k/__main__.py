"""`python -m geo3k ...` runs the `geo3k` command (how torchrun starts it: `torchrun ... -m geo3k train`)."""

from geo3k.cli import main

main()
