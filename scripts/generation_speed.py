"""Generation throughput for the corpus: answer tokens written per second by each way of writing them.

    OMP_NUM_THREADS=1 python scripts/generation_speed.py --data ../shared/data/arena/question.jsonl --limit 64 \
        --max-new-tokens 64 [--ways bf16-b8,bf16-b32,...] [--repeat 1]

Ways (interleaved, in the order given, --repeat rounds, so a busy machine's load falls on all alike):
    {bf16,fp32}-b{N}[-sample]   `distill`'s own work on the prompts (data/examples.label_shard: batched
                                replies with their labels), N prompts per batch, greedy or sampled
                                (temperature 0.8, top-p 0.95)
    {bf16,fp32}-spec            our speculative decoding, one stream (CTCDrafter.chat, the default draft
                                and proposer), prompt by prompt
Each base is loaded once (outside the timings). Prints wall and process-CPU tokens/s per run: on a
shared machine the CPU-time rate is the fairer comparison.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def distill_way(base, records, batch: int, sample: bool, max_new: int) -> int:
    from ctc_drafter.data.distill import DistillOptions
    from ctc_drafter.data.examples import label_shard

    opts = DistillOptions(max_new_tokens=max_new, batch_size=batch, shard_size=len(records),
                          temperature=0.8 if sample else 0.0, top_p=0.95 if sample else 1.0)
    _, stats = label_shard(base, records, opts, 0)
    return stats.assistant_tokens


def spec_way(drafter, records, max_new: int) -> int:
    return sum(drafter.chat(r.users[0], max_new_tokens=max_new).new_tokens for r in records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/arena/question.jsonl"))
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ways", default="bf16-b32,fp32-b32,bf16-b8,fp32-b8,bf16-b64,fp32-b64,bf16-b32-sample,"
                                      "bf16-spec,fp32-spec,bf16-b64-sample")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    from ctc_drafter.data.conversations import iter_conversations
    from ctc_drafter.decoding import CTCDrafter
    from ctc_drafter.models.cpu_info import cpu_identity

    records = list(iter_conversations([Path(args.data)]))[: args.limit]
    ways = args.ways.split(",")
    drafters = {dt: CTCDrafter.from_pretrained("default", "default", device="cpu", dtype=name)
                for dt, name in (("bf16", "bfloat16"), ("fp32", "float32")) if any(w.startswith(dt) for w in ways)}
    print(f"cpu: {cpu_identity()['cpu']}; torch threads {torch.get_num_threads()}; {len(records)} prompts, "
          f"{args.max_new_tokens} new tokens", flush=True)
    for r in range(args.repeat):
        for way in ways:
            dt, kind, *rest = way.split("-")
            d = drafters[dt]
            load, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
            if kind == "spec":
                tokens = spec_way(d, records, args.max_new_tokens)
            else:
                tokens = distill_way(d.base, records, int(kind[1:]), rest == ["sample"], args.max_new_tokens)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"round {r + 1} {way}: {tokens} tokens, wall {wall:.1f} s = {tokens / wall:.1f} tok/s, "
                  f"cpu {cpu:.1f} s = {tokens / cpu:.1f} tok/cpu-s (load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
