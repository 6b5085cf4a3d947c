"""`gpt2fn <command> ...`: a thin shell over the Python API.

Each subcommand is a module in `gpt2fn/commands/` defining `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; the CLI discovers them, so adding a command touches no other file. Expected failures (bad
flags, missing files, offline hub names) print one line `error: ...` and exit 1 (2 for usage), never a traceback.
"""

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import commands

__all__ = ["main", "CLIError"]


class CLIError(Exception):
    """A failure to report to the user as one line (raised by commands for bad flag values and the like)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2fn", description="GPT-2 as a functional program.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = getattr(module, "NAME", info.name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
