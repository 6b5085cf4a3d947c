"""`gpt2fn <command> ...`: a thin shell over the Python API.

Each subcommand is a module in `gpt2fn/commands/` defining `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; the CLI discovers them, so adding a command touches no other file.

The commands that read a model share one set of options and one loader, defined here: `add_model_options`
(`--checkpoint PATH | --model NAME | --preset NAME` with `--seed`, `--device` with "auto", `--dtype`), then
`device_option(args)`, `dtype_option(args)` and `load_model(args, ...)`. The device policy and the dtype names are
`gpt2fn.devices`'.

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
from typing import Any

import torch

from . import commands

__all__ = ["main", "CLIError", "add_model_options", "add_device_option", "add_dtype_option", "device_option",
           "dtype_option", "load_model"]


class CLIError(Exception):
    """A failure to report to the user as one line (raised by commands for bad flag values and the like)."""


_DEBUG_HELP = "show the full traceback of any error instead of one line"
_DTYPE_HELP = "cast the weights: float32 (fp32), bfloat16 (bf16) or float16 (fp16) (default: as stored)"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device D`: auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (`gpt2fn.devices`)."""
    parser.add_argument("--device", default="auto", metavar="D",
                        help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")


def add_dtype_option(parser: argparse.ArgumentParser, help_text: str = _DTYPE_HELP, default: str | None = None
                     ) -> None:
    """`--dtype NAME`: a name of `gpt2fn.devices.DTYPES`, checked by `dtype_option` (or the command)."""
    parser.add_argument("--dtype", default=default, metavar="NAME", help=help_text)


def add_model_options(parser: argparse.ArgumentParser, *, preset: bool = True, model_aliases: tuple[str, ...] = (),
                      default: str = "--model gpt2", seed_help: str | None = None, dtype_help: str = _DTYPE_HELP,
                      dtype_default: str | None = None, quantize: bool = True) -> None:
    """Where the weights come from, one of `--checkpoint PATH`, `--model NAME` (a hub name) or, with `preset`,
    `--preset NAME` (random weights, seeded by `--seed`); then `--device`, `--dtype` and, with `quantize` (commands
    that only read the weights), `--quantize int8` (`gpt2fn.quantize` after loading). `default` names the source
    used when none is given (for the help text; `load_model` takes it as an argument)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="a checkpoint file or directory: seed .pth, Hugging Face, nanoGPT or gpt2fn safetensors")
    source.add_argument("--model", *model_aliases, dest="model", metavar="NAME", default=None,
                        help=f"a hub name such as gpt2, from the local Hugging Face cache first (default: {default})")
    if preset:
        source.add_argument("--preset", metavar="NAME", default=None,
                            help="random weights of a preset config (tiny, mini, gpt2, ...), seeded by --seed")
        parser.add_argument("--seed", type=int, default=0, metavar="S",
                            help=seed_help or "seed of the random weights for --preset (default 0)")
    add_device_option(parser)
    add_dtype_option(parser, dtype_help, dtype_default)
    if quantize:
        parser.add_argument("--quantize", choices=("int8",), default=None,
                            help="quantize the loaded weights to int8, one fp32 scale per output column "
                                 "(gpt2fn.quantize); an int8 checkpoint loads as int8 without it")


def device_option(args: argparse.Namespace) -> torch.device:
    """`--device` as a device present on this machine ("auto": `gpt2fn.devices.default_device()`), or a CLIError."""
    from .devices import parse_device

    try:
        device = parse_device(args.device or "auto")
    except ValueError as exc:
        raise CLIError(f"--device: {exc}") from None
    assert device is not None
    return device


def dtype_option(args: argparse.Namespace) -> torch.dtype | None:
    """`--dtype` as a torch dtype (None: as stored), or a CLIError listing the names."""
    from .devices import parse_dtype

    try:
        return parse_dtype(args.dtype)
    except ValueError as exc:
        raise CLIError(f"--dtype: {exc}") from None


def load_model(args: argparse.Namespace, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
               default_preset: str | None = None, overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
    """`(params, name)` from the options of `add_model_options`: `--checkpoint` or `--model` through `gpt2fn.load`,
    `--preset` (or `default_preset` when no source is given) through `init_params(preset(name, **overrides),
    seed=--seed)`; with none of them the hub model `gpt2`. `device`/`dtype` place and cast the weights (None: as
    stored, on the CPU)."""
    from .checkpoints import load
    from .config import preset
    from .params import init_params

    name = getattr(args, "preset", None)
    if name is None and args.checkpoint is None and args.model is None:
        name = default_preset
    if name is not None:
        config = preset(name, **(overrides or {}))
        params, source = init_params(config, seed=args.seed, device=device, dtype=dtype), f"preset {name}"
    else:
        source = args.checkpoint or args.model or "gpt2"
        params = load(source, device=device, dtype=dtype)
    if getattr(args, "quantize", None) is not None:
        from .quantize import quantize

        if dtype is not None and dtype != torch.float32:
            raise CLIError(f"--quantize {args.quantize} quantizes fp32 weights; drop --dtype {args.dtype}")
        params = quantize(params, args.quantize)
    return params, source


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
