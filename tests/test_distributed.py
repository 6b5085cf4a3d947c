"""Data parallel: two gloo processes under torchrun equal one process over the combined batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree

from gpt2fn import named_leaves
from gpt2fn.cli import main as cli_main
from gpt2fn.train import DistInfo, all_reduce_mean, load_state
from gpt2fn.train.state import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _args(corpus: Path, out: Path, batch: int) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), "--preset", "tiny", "--set", "vocab_size=50257",
            "--context", "16", "--batch-size", str(batch), "--steps", "3", "--lr", "3e-3", "--warmup", "1",
            "--eval-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu",
            "--cache-dir", str(out.parent / "cache")]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_gloo_ranks_match_one_process_over_the_combined_batch(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    import pydoc_data.topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:4]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PYTEST_XDIST_WORKER", None)
    assert cli_main(["train", *_args(corpus, tmp_path / "one", 4)]) == 0  # in-process: the reference run
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "gpt2fn.train",
                          *_args(corpus, tmp_path / "two", 2), "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and "global batch 4" in two.stderr
    a, b = load_state(tmp_path / "one" / STATE_FILE), load_state(tmp_path / "two" / STATE_FILE)
    assert a.step == b.step == 3
    for (name, x), y in zip(named_leaves(a.params), pytree.tree_leaves(b.params), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    assert _losses(tmp_path / "two")[0] > _losses(tmp_path / "two")[-1]  # it trained
    # only rank 0 wrote: one metrics line per step
    assert len(_losses(tmp_path / "two")) == 3


def test_all_reduce_mean_is_the_identity_in_one_process():
    tree = {"a": torch.arange(3.0), "b": (torch.ones(2, 2),)}
    out = all_reduce_mean(tree, DistInfo())
    assert out is tree
