#!/usr/bin/env bash
# Self-generated training data for the embedded default base, outside the repository:
#   1. make-prompts: the base writes user prompts (seeds SEED_START .. SEED_START+COUNT-1)
#   2. distill: the base answers them (greedy, batched), shards with hidden states for `train`
#   3. with GSM8K_TRAIN=<path to gsm8k train.jsonl>: the base answers those questions too (own folder)
# All steps resume: rerun the same command after an interruption. Background, lowest priority:
#   nice -n 19 env OMP_NUM_THREADS=1 WORKERS=2 bash scripts/self_distill.sh > ~/.cache/ctc-drafter/distill/self.log 2>&1 &
# DTYPE (default bfloat16): on CPUs with AMX/AVX512-BF16 bf16 distils ~1.7x faster than fp32, and its
# labels are the fp32 base's own greedy tokens at 99.0 % of positions (BENCHMARKS.md, "Distillation");
# bf16, greedy, batch 32 is the fastest way measured to write answers ("Generation throughput for the corpus").
# More data later: a new chunk with its own seeds and folder, e.g. CHUNK=1 SEED_START=4000 (then train
# with --data for each folder); a chunk's prompt file must be complete before it is distilled.
# CORPUS=corpus: keep the answers in the repository too (`corpus add`, checked against BENCHMARK_FILES,
# space-separated MT-bench / GSM8K test question files); `corpus build` remakes the training set anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${CTC_SELF_DATA:-$HOME/.cache/ctc-drafter/distill}
CHUNK=${CHUNK:-0}
COUNT=${COUNT:-4000}
SEED_START=${SEED_START:-$((CHUNK * COUNT))}
DTYPE=${DTYPE:-bfloat16}
WORKERS=${WORKERS:-1}
SUFFIX=$([ "$CHUNK" = 0 ] && echo "" || echo "-$CHUNK")
PROMPTS="$ROOT/smollm2-self-prompts-$DTYPE/prompts$SUFFIX.jsonl"
OUT="$ROOT/smollm2-self-$DTYPE$SUFFIX"
CLI=(.venv/bin/python -m ctc_drafter)

"${CLI[@]}" make-prompts --base-model default --out "$PROMPTS" --count "$COUNT" --seed-start "$SEED_START" \
    --temperature 1.0 --top-p 0.95 --max-new-tokens 256 --batch-size 32 --dtype "$DTYPE"
"${CLI[@]}" distill --base-model default --data "$PROMPTS" --out "$OUT" --max-new-tokens 256 --save-hidden \
    --batch-size 32 --shard-size 64 --dtype "$DTYPE" --workers "$WORKERS"
BENCH=(); for f in ${BENCHMARK_FILES:-}; do BENCH+=(--benchmark "$f"); done
if [ -n "${CORPUS:-}" ]; then
    "${CLI[@]}" corpus add "$OUT" --corpus "$CORPUS" --base-model default "${BENCH[@]}"
fi
if [ -n "${GSM8K_TRAIN:-}" ]; then
    "${CLI[@]}" distill --base-model default --data "$GSM8K_TRAIN" --out "$ROOT/smollm2-gsm8k-train-$DTYPE" \
        --max-new-tokens 256 --save-hidden --batch-size 32 --shard-size 64 --dtype "$DTYPE" --workers "$WORKERS"
    if [ -n "${CORPUS:-}" ]; then
        "${CLI[@]}" corpus add "$ROOT/smollm2-gsm8k-train-$DTYPE" --corpus "$CORPUS" --base-model default "${BENCH[@]}"
    fi
fi
