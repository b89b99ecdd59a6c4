"""``robust-rlhf``: one console command with a subcommand per job.

Each subcommand lives in its own module of this package and exposes ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. User errors (``InputError``, a missing file,
a malformed spec) are printed as one line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Subcommand modules, in the order ``--help`` lists them. Imported lazily so that ``--help`` and
# light subcommands never pay for torch/transformers imports they do not need.
SUBCOMMANDS: tuple[str, ...] = (
    "validate",
    "predict",
    "simulate",
    "fit",
    "check",
    "figures",
    "finetune",
    "data-check",
    "generate-references",
    "evaluate",
    "experiment",
)

# Commands whose work is numpy/torch array arithmetic on the CPU, where glibc's default of returning
# freed blocks to the kernel costs page faults (``_allocator``); the LLM commands keep the default.
ARRAY_COMMANDS = frozenset({"validate", "predict", "simulate", "fit", "check", "figures"})

DESCRIPTION = """\
robust-rlhf: preference learning when the Bradley-Terry model is wrong.

Simulate preference data under named misspecifications, fit the MLE and VRPO estimators,
compare them with their exact asymptotic theory, and fine-tune LLMs with the same losses.
Run `robust-rlhf COMMAND --help` for the options of one command."""


def _load(name: str):
    return importlib.import_module(f"robust_rlhf.cli.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand's arguments."""
    parser = argparse.ArgumentParser(
        prog="robust-rlhf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        p = sub.add_parser(
            module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robust-rlhf`` console script."""
    from robust_rlhf.theory.errors import InputError

    from ._allocator import tune_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ARRAY_COMMANDS:
        tune_allocator()
    try:
        return int(args._module.run(args) or 0)
    except InputError as exc:
        print(f"robust-rlhf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        name = exc.filename
        folder = Path(name).parent if name else None
        what = f"file not found: {name or exc}" + (
            f" (its folder {folder} does not exist)" if folder is not None and not folder.is_dir() else "")
        print(f"robust-rlhf {args.command}: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robust-rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output (`| head`) has gone: stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
