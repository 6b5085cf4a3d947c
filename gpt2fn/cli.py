"""`gpt2fn <command> ...`: a thin shell over the Python API.

Each subcommand is a module in `gpt2fn/commands/` defining `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; the CLI discovers them, so adding a command touches no other file.

Error policy: the library raises its own documented types for bad input (`CheckpointError` for files,
`ShapeError` for mismatched tensors, `ValueError` for bad argument values, `OSError`s for files it cannot
read or write), and commands raise `CLIError` for bad flags. Those print one line `error: ...` and exit 1
(2 for usage). Anything else (a torch RuntimeError, out of memory, a bug) is not hidden: it propagates with
its traceback. `--debug` (before or after the command) shows the traceback for every error.
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


_DEBUG_HELP = "show the full traceback of any error instead of one line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2fn", description="GPT-2 as a functional program.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = getattr(module, "NAME", info.name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The documented error types of bad input, printed as one line (see the module docstring)."""
    from .checkpoints import CheckpointError
    from .shapes import ShapeError

    return (CLIError, CheckpointError, ShapeError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except _expected_errors() as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
