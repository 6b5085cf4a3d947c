#!/usr/bin/env bash
# Make the environment gpt2fn needs, idempotently: a .venv in the checkout with torch, gpt2fn and its dev extra,
# and the GPT-2 BPE table in the user cache. Safe to run again: each step is skipped when already done.
#
#   GPT2FN_VENV        where the virtual environment lives (default: <checkout>/.venv)
#   GPT2FN_TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, a CPU wheel that lies on
#                      the disk of the machines this project is built on; an open range would pull a multi-GB
#                      CUDA build there). Use e.g. GPT2FN_TORCH_SPEC=torch for your platform's default build.
#   PYTHON             the interpreter that creates the venv (default: python3, needs >= 3.10)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPT2FN_VENV:-$root/.venv}"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    echo "setup: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "setup: installing ${GPT2FN_TORCH_SPEC:-torch==2.13.0}" >&2
    "$py" -m pip install --quiet --disable-pip-version-check "${GPT2FN_TORCH_SPEC:-torch==2.13.0}"
fi
stamp="$venv/.gpt2fn-install-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) $root"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$py" -c "import gpt2fn, pytest, hypothesis" 2>/dev/null; then
    echo "setup: installing gpt2fn[dev] (editable)" >&2
    "$py" -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
    echo "$want" > "$stamp"
fi
"$py" -c "import sys; from gpt2fn.tokenizer import main; sys.exit(main(['fetch', '--quiet']))"
# gpt2fn's native kernel (gpt2fn/native): built now rather than on the first decode; optional, so a failed build
# only reports why (decoding then takes the split views of gpt2fn.kernels)
"$py" -c "from gpt2fn import native; print('setup: native kernel', native.status())" >&2
# Headless Chromium for the browser tests of the HTML views (tests/test_html_browser.py skip, saying why, without
# it). Best effort: never fails the setup. Skipped with GPT2FN_NO_CHROMIUM=1, or when one is already on PATH.
if [ "${GPT2FN_NO_CHROMIUM:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1 \
        && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "setup: installing chromium (apt; GPT2FN_NO_CHROMIUM=1 skips this)" >&2
        { apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
            || echo "setup: chromium not installed; the browser tests will be skipped" >&2
    else
        echo "setup: no chromium (and no root apt-get to install it); the browser tests will be skipped" >&2
    fi
fi
true
