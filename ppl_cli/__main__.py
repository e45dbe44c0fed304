"""`python -m ppl_cli`: the command line (what torchrun starts)."""

from .cli import cli

if __name__ == "__main__":
    cli()
