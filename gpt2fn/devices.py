"""One device policy and one table of dtype names, for the Python API and every CLI command.

    default_device()            # CUDA, then Apple's MPS, then the CPU
    parse_device("auto")        # the same choice; "cpu", "cuda", "cuda:1", "mps" are checked to exist here
    parse_dtype("bf16")         # torch.bfloat16; every name of DTYPES, or a torch.dtype itself
    dtype_name(torch.bfloat16)  # "bfloat16": torch's own name, which parse_dtype reads back

Why CUDA before MPS before the CPU: it is the order the seed's scripts and most GPT-2 code (nanoGPT, the
`transformers` examples) use, fastest first. Under `torchrun` each process takes its own GPU: `gpt2fn train` maps
"auto" and "cuda" to `cuda:$LOCAL_RANK` itself (a data-parallel concern, not a device preference). Bad names and
devices this machine lacks raise ValueError (a `CheckpointError`, which is one, when they come through `load`).
"""

import torch

__all__ = ["default_device", "parse_device", "DTYPES", "parse_dtype", "dtype_name"]


def default_device() -> torch.device:
    """The fastest device present: CUDA, then Apple's MPS, then the CPU (what "auto" means everywhere)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: torch.device | str | None) -> torch.device | None:
    """A torch device that exists on this machine, from itself, a name (`cpu`, `cuda`, `cuda:1`, `mps`) or "auto"
    (`default_device()`); None stays None (the caller's default). A ValueError names the choices for a name torch
    does not know and says which devices are here for one that is not."""
    if device is None:
        return None
    if isinstance(device, str) and device.strip().lower() == "auto":
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a torch.device or a name such as 'cpu', 'cuda:0' or 'auto', got "
                         f"{type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc}); use auto, cpu, cuda, cuda:N or "
                         "mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this machine (or this torch build) has no CUDA GPU; use "
                             "device='cpu' (or 'auto')")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use device='cpu' (or 'auto')")
    return dev


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
"""Every name a user may give for a weight or compute dtype (flags, `load(dtype=...)`, `TrainConfig.dtype`)."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or a name of DTYPES (case-insensitive, `torch.` prefix allowed: `float32`, `bf16`,
    `torch.float16`, ...); None stays None. A ValueError lists the names for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a torch.dtype or a name such as 'float32' or 'bf16', got "
                         f"{type(dtype).__name__} {dtype!r}")
    key = dtype.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of a dtype (`float32`, `bfloat16`, `int64`): what `gpt2fn inspect` and `convert` print;
    `parse_dtype(dtype_name(d)) is d` for every dtype in DTYPES."""
    return str(dtype).removeprefix("torch.")
