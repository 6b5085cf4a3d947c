"""Every script in examples/ runs offline on random weights (in-process via runpy, so the imports are paid once);
one that trains runs at the reduced size ARGS gives it."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))

# what each example must print, so a script that runs but says nothing useful still fails
EXPECT = {
    "activation_patching.py": "fraction recovered by patching resid_pre",
    "steer_generation.py": "positive: ",
    "direct_logit_attribution.py": "sum of the shares",
    "head_ablation.py": "change in loss per ablated head",
    "logit_lens.py": "next-token guesses after each layer",
    "per_example_gradients.py": "vmap(grad) vs grad of example 0 alone",
    "induction_heads.py": "K-composition of the previous-token head",
    "attribution_patching.py": "AtP per head vs exact head patching: correlation",
    "sparse_autoencoder.py": "spliced with the error term, max |logit change|: 0.00e+00",
    "intervention_sweep.py": "max |vmap - loop| over the scales",
    "generate_with_capture.py": "max |generate capture - forward_with on the final ids|",
}

# examples that train take a reduced size here (their defaults are the full size, minutes)
ARGS = {
    "induction_heads.py": ["--steps", "30", "--batch", "8"],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES) == sorted(EXPECT)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_offline_on_random_weights(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), *ARGS.get(path.name, [])])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert EXPECT[path.name] in out
    if path.name == "activation_patching.py":
        # layer 0 at the one position where "John" and "Mary" differ: patching the embedding there is the clean run
        row = next(line.split() for line in out.splitlines() if line.strip().startswith("0 "))
        assert "1.00" in row[1:]
    if path.name == "induction_heads.py":
        assert "induction head: 1." in out and "path patching 0." in out

    if path.name == "generate_with_capture.py":
        # the captures while generating (plain and steered) are forward_with's on the final ids
        gaps = [float(line.rsplit(": ", 1)[1]) for line in out.splitlines() if "max |" in line]
        assert len(gaps) == 2 and max(gaps) < 1e-4, gaps
