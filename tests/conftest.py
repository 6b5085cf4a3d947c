"""Shared fixtures: the devices present, small configs with pairwise-distinct sizes, hypothesis settings."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from gpt2fn import GPTConfig, GPTParams, init_params, preset

# The project's own scripts (scripts/bench.py, scripts/bench_peers.py) are imported by their tests as modules, for
# real: an ImportError in one of them fails those tests; it is never turned into a skip.
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker; two workers share the two cores

# The device and parameter fixtures are immutable, so sharing them across hypothesis examples is safe.
_shared = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("default", max_examples=25, **_shared)
settings.register_profile("thorough", max_examples=300, **_shared)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.fixture(scope="session", params=available_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device present: cpu always, cuda / mps when available."""
    return torch.device(request.param)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):
    """1 and 2 torch threads: CPU decoding runs on two (the split products of gpt2fn.kernels), a test worker on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp() -> GPTParams:
    """preset("tiny") with the token embedding scaled by 8: sharp logits, so greedy ties cannot flip on float
    rounding (a module may define its own `sharp` with another scale)."""
    p = init_params(preset("tiny"), seed=0)
    return p.replace(tok_emb=p.tok_emb * 8)


@pytest.fixture(scope="module")
def wordy() -> GPTParams:
    """GPT-2's vocabulary (text round-trips through the real tokenizer), width 32."""
    return init_params(preset("mini", emb_dim=32, n_heads=2, context_length=64), seed=1)


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    """vocab 97, ctx 32, d_model 24, 3 heads of 8, d_mlp 96, 2 layers: all sizes distinct."""
    return preset("tiny")


@pytest.fixture
def tiny_params(tiny_config: GPTConfig, device: torch.device):
    return init_params(tiny_config, seed=0, device=device)
