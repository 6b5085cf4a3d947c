"""`python -m gpt2fn.train ...` and `torchrun --nproc_per_node=K -m gpt2fn.train ...`: same flags as `gpt2fn train`."""

import sys

from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
