"""Hub names (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`, `org/name`) resolved to a local
Hugging Face directory through `huggingface_hub`: the local cache first, then a download unless offline.

The cache is the one `huggingface_hub` uses (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`), read when called, so a changed environment takes effect at once.
"""

import os
import re
from pathlib import Path

from .common import CheckpointNotFoundError

__all__ = ["ALIASES", "looks_like_hub_name", "cache_dir", "offline", "resolve"]

# the short names moved under organisations; a cache filled under either name is found
ALIASES = {
    "gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def looks_like_hub_name(source: str) -> bool:
    return bool(_NAME.fullmatch(source)) and not source.lower().endswith(_FILE_SUFFIXES)


def cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name: str, *, download: bool = True) -> Path:
    """The local snapshot directory of hub model `name` (cached copy first; then a download unless offline)."""
    from huggingface_hub import snapshot_download

    cache = cache_dir()
    repos = [name] + ([ALIASES[name]] if name in ALIASES else [])
    for repo in repos:
        try:
            folder = Path(snapshot_download(repo, cache_dir=cache, local_files_only=True, allow_patterns=_PATTERNS))
        except Exception:  # noqa: BLE001 - any failure here means "not usable from the cache"; try the next
            continue
        if (folder / "config.json").is_file():
            return folder
    how = (f"on a machine with network access run `hf download {repos[-1]} {' '.join(_PATTERNS[:2])}` "
           f"(or `gpt2fn convert {name} {name.replace('/', '--')}.safetensors` and copy that file), then "
           f"copy the cache to {cache} or point HF_HOME / HF_HUB_CACHE at it")
    if offline() or not download:
        raise CheckpointNotFoundError(
            f"{name!r} is not a file or directory, and the Hugging Face model {name!r} is not in the local cache "
            f"{cache} while downloads are off (HF_HUB_OFFLINE=1). To get it: {how}")
    try:
        folder = Path(snapshot_download(repos[-1], cache_dir=cache, allow_patterns=_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - network, auth and not-found errors all end the same way for us
        raise CheckpointNotFoundError(
            f"{name!r} is not a file or directory, and downloading the Hugging Face model {repos[-1]!r} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the name and the "
            f"network, or: {how}") from exc
    return folder
