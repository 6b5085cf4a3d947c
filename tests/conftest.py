"""Shared fixtures: the devices present, small configs with pairwise-distinct sizes, hypothesis settings."""

import os

import pytest
import torch
from hypothesis import settings

from gpt2fn import GPTConfig, init_params, preset

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker; two workers share the two cores

settings.register_profile("default", deadline=None, max_examples=25, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.fixture(params=available_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device present: cpu always, cuda / mps when available."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    """vocab 97, ctx 32, d_model 24, 3 heads of 8, d_mlp 96, 2 layers: all sizes distinct."""
    return preset("tiny")


@pytest.fixture
def tiny_params(tiny_config: GPTConfig, device: torch.device):
    return init_params(tiny_config, seed=0, device=device)
