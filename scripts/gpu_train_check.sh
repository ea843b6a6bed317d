#!/usr/bin/env bash
# The GPU training path in one device call (issue 15, step 3): distillation with --gpus and a short
# `accelerate launch --mixed_precision bf16` training of a draft for a small random Llama on CUDA, then the
# trained checkpoint loads in `generate` on CUDA and decodes losslessly.
#   run(command="bash scripts/gpu_train_check.sh", carry=[".gpu_assets"], timeout_s=300)
# .gpu_assets/tok holds SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json,
# chat_template.jinja), copied from the converted embedded default (~/.cache/ctc-drafter/smollm2-135m-instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DEV=${DEVICE:-cuda}  # DEVICE=cpu: the same steps on the CPU (checks the script, not the GPU)
if [ "$DEV" = cpu ]; then PAR="--workers 1"; else PAR="--gpus 0"; fi
W=${WORK:-/tmp/gtc}; OUTD=${OUT:-/tmp/gtc_out}; rm -rf "$W"; mkdir -p "$W" "$OUTD"
python3 - "$W/base" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(".gpu_assets/tok")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print("base saved", sys.argv[1])
PY
echo "== distill $PAR"
python3 -m ctc_drafter distill --base-model "$W/base" --data tests/data/gsm8k_train_head8.jsonl tests/data/arena_question_head6.jsonl \
  --out "$W/data" $PAR --max-new-tokens 96 --dtype bfloat16 --json | tee "$OUTD/distill.json"
echo "== accelerate launch --mixed_precision bf16 train"
python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no $([ "$DEV" = cpu ] && echo --cpu) \
  -m ctc_drafter.train --base-model "$W/base" --data "$W/data" --out "$W/draft" --epochs 8 --bs 2 --lr 1e-3 \
  --frames 4 --label-len 3 --eval-frac 0.2 --log-every 1 --device "$DEV" 2>&1 | tr "\r" "\n" | grep -v "step/s" | tail -n 5
cp "$W/draft/"*.jsonl "$OUTD/" 2>/dev/null || true
echo "== generate on cuda with the trained draft"
python3 -m ctc_drafter generate --base-model "$W/base" --draft-model "$W/draft" --device "$DEV" --prompt "What is 12 times 7?" \
  --max-new-tokens 40 --json | tail -n 1 | tee "$OUTD/generate.json"
python3 - "$W" "$DEV" <<'PY'
import json, sys, torch
from ctc_drafter.decoding import CTCDrafter
w = sys.argv[1]
d = CTCDrafter.from_pretrained(f"{w}/base", f"{w}/draft", device=sys.argv[2], dtype="float32")
ids = d.base.tokenizer("Tell me about the sea.", return_tensors="pt").input_ids
spec = d.generate(ids, max_new_tokens=48, speculative=True); plain = d.generate(ids, max_new_tokens=48, speculative=False)
log = [json.loads(l) for l in open(f"{w}/draft/log.jsonl")] if __import__("os").path.exists(f"{w}/draft/log.jsonl") else []
ep = [r for r in log if r.get("event") == "epoch"]
print(json.dumps({"fp32_spec_equals_vanilla": spec.tokens == plain.tokens, "epochs": len(ep),
                  "train_loss": [round(r["train"]["loss"], 3) for r in ep],
                  "eval_loss": [round(r["eval"]["loss"], 3) for r in ep if r.get("eval")]}))
PY
