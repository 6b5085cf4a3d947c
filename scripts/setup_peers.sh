#!/usr/bin/env bash
# The optional speed peers of scripts/bench.py, each in a virtual environment of its own (never needed by the tests
# or CI; bench.py skips a peer with a note when its environment is absent). Idempotent: a finished step is skipped.
#
#   scripts/setup_peers.sh              # both peers
#   scripts/setup_peers.sh ct2          # CTranslate2 only
#   scripts/setup_peers.sh llamacpp     # llama.cpp only (builds from source: about 8 minutes on 2 cores)
#
#   GPT2FN_PEERS_DIR    where the environments live (default: <checkout>/.peers, ignored by git); bench.py finds
#                       them there, or through GPT2FN_CT2_PYTHON / GPT2FN_LLAMACPP_PYTHON
#   GPT2FN_TORCH_SPEC   the torch requirement of both environments (default: torch==2.13.0, the CPU wheel gpt2fn's
#                       setup.sh installs). The converters need it: CTranslate2's loads the model through
#                       transformers, llama.cpp's convert_hf_to_gguf.py reads tensors with torch.
#   PYTHON              the interpreter that creates the environments (default: python3)
#
# Layout:
#   $GPT2FN_PEERS_DIR/ct2/          ctranslate2 + transformers + torch
#   $GPT2FN_PEERS_DIR/llamacpp/     llama-cpp-python, built here for this CPU (-DGGML_NATIVE=ON), with the sdist's
#                                   gguf-py and the converter's requirements (transformers pinned as its file says)
#   $GPT2FN_PEERS_DIR/llamacpp-src/ the unpacked llama-cpp-python sdist: vendor/llama.cpp/convert_hf_to_gguf.py
#                                   is the converter matching the built library (peer_worker.py finds it here)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${GPT2FN_PEERS_DIR:-$root/.peers}"
torch_spec="${GPT2FN_TORCH_SPEC:-torch==2.13.0}"
CT2_SPEC="ctranslate2==4.8.5"
CT2_TRANSFORMERS="transformers==5.25.0"   # the version gpt2fn's dev environment saves the model with
LLAMA_VERSION="0.3.36"
# convert_hf_to_gguf.py's own requirements (vendor/llama.cpp/requirements/requirements-convert_legacy_llama.txt)
LLAMA_CONVERT_DEPS=("transformers==4.57.6" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0")
say() { echo "setup_peers: $*" >&2; }
pip_in() { local venv="$1"; shift; nice -n 10 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        say "creating $1"
        mkdir -p "$dir"
        "${PYTHON:-python3}" -m venv "$1"
    fi
}

setup_ct2() {
    local venv="$dir/ct2"
    make_venv "$venv"
    if ! "$venv/bin/python" -c "import ctranslate2, transformers, torch" 2>/dev/null; then
        say "installing $CT2_SPEC, $CT2_TRANSFORMERS, $torch_spec into $venv"
        pip_in "$venv" "$torch_spec"
        pip_in "$venv" "$CT2_SPEC" "$CT2_TRANSFORMERS"
    fi
    say "ct2 ready: $("$venv/bin/python" -c 'import ctranslate2; print("ctranslate2", ctranslate2.__version__)')"
}

setup_llamacpp() {
    local venv="$dir/llamacpp" src="$dir/llamacpp-src"
    local tree="$src/llama_cpp_python-$LLAMA_VERSION"
    make_venv "$venv"
    if [ ! -f "$tree/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
        say "fetching the llama-cpp-python $LLAMA_VERSION source archive"
        mkdir -p "$src"
        "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            --dest "$src" "llama-cpp-python==$LLAMA_VERSION"
        tar -xzf "$src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$src"
    fi
    if ! "$venv/bin/python" -c "import torch, transformers, gguf, numpy" 2>/dev/null; then
        say "installing the converter's requirements and gguf-py into $venv"
        pip_in "$venv" "$torch_spec"
        pip_in "$venv" "${LLAMA_CONVERT_DEPS[@]}" "$tree/vendor/llama.cpp/gguf-py"
    fi
    if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
        # a native build for this CPU (AVX-512 where it has it), without the multimodal library bench.py never
        # loads; nice so that a build on a shared machine takes the idle cycles first
        say "building llama-cpp-python $LLAMA_VERSION from source (about 8 minutes on 2 cores)"
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF ${GPT2FN_LLAMACPP_CMAKE_ARGS:-}" \
            CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            pip_in "$venv" --no-binary llama-cpp-python "$src/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    fi
    say "llamacpp ready: $("$venv/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(ct2 llamacpp)
for t in "${targets[@]}"; do
    case "$t" in
        ct2) setup_ct2 ;;
        llamacpp) setup_llamacpp ;;
        *) say "unknown peer '$t'; choose ct2 or llamacpp"; exit 2 ;;
    esac
done
