"""Generation throughput for the corpus in vLLM CPU: answer tokens written per second, batched, greedy.

The peer of scripts/generation_speed.py's `bf16-bN` ways (distill's own batched replies) for issue 36 item 3
("an existing engine if it beats ours"); run it in vLLM's own environment, right beside that script:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 VLLM_CPU_KVCACHE_SPACE=2 OMP_NUM_THREADS=1 \\
      /work/venv-vllm/bin/python scripts/vllm_generation_speed.py --data arena64.jsonl --limit 64 \\
      --max-new-tokens 64 --batches 32,64

The base folder is the embedded default converted to HF (~/.cache/ctc-drafter/smollm2-135m-instruct); vLLM
renders the tokenizer's chat template itself (`LLM.chat`). The engine is loaded once per batch size, outside
the timings; a run is timed in wall and process-CPU seconds (in-process engine: V1 multiprocessing off).
Labels would still come from `corpus build`'s teacher forcing, so only the written text's speed matters here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path.home() / ".cache/ctc-drafter/smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, required=True, help="JSON Lines with {turns: [...]} (the first turn is asked)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="32,64", help="max_num_seqs values, comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    rows = [json.loads(x) for x in args.data.read_text(encoding="utf-8").splitlines() if x.strip()]
    chats = [[{"role": "user", "content": r["turns"][0]}] for r in rows[: args.limit]]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, seed=0)
    for batch in (int(b) for b in args.batches.split(",")):
        llm = LLM(model=str(args.base), enforce_eager=True, dtype=args.dtype, max_model_len=2048, seed=0,
                  max_num_seqs=batch)
        llm.chat(chats[:2], greedy, use_tqdm=False)  # warm-up outside the timing
        w0, c0 = time.perf_counter(), time.process_time()
        outs = llm.chat(chats, greedy, use_tqdm=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"way": f"vllm-{args.dtype}-b{batch}", "prompts": len(chats), "answer_tokens": tokens,
                          "wall_s": round(wall, 1), "tok_per_s": round(tokens / wall, 1), "cpu_s": round(cpu, 1),
                          "tok_per_cpu_s": round(tokens / cpu, 1)}), flush=True)
        del llm


if __name__ == "__main__":
    main()
