"""Subcommands of the `gpt2fn` CLI, one module each (see `gpt2fn.cli`)."""
