#!/usr/bin/env bash
# The test command: set up the environment if needed (scripts/setup.sh), then run the whole suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k cache -x`. GPT2FN_TEST_WORKERS sets the xdist workers.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${GPT2FN_VENV:-$root/.venv}/bin/python" -m pytest -q -n "${GPT2FN_TEST_WORKERS:-2}" "$@"
