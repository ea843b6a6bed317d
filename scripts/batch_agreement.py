"""How often batched greedy decoding (distill's) differs from one-prompt-at-a-time greedy decoding.

    OMP_NUM_THREADS=1 python scripts/batch_agreement.py [--prompts 32] [--max-new-tokens 128] [--batch-size 32]

Greedy replies to the first --prompts arena prompts, once in batches of --batch-size (left padding,
as `distill` runs them) and once each alone (no padding: what unbatched greedy decoding computes).
In exact arithmetic they are equal; in float32 the padded batch rounds differently and a near-tie
between the two best tokens can flip, after which the reply goes its own way. Prints the replies
that are identical and the share of tokens before the first difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctc_drafter.data.batch_generation import generate_batch
from ctc_drafter.data.labelling import pad_id
from ctc_drafter.models.base import load_base_model
from ctc_drafter.models.templates import build_prompt_ids

ARENA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "question.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ARENA))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base-model", default="default")
    a = ap.parse_args()
    base = load_base_model(a.base_model, device="cpu")
    turns = [json.loads(line)["turns"][0] for line in open(a.data) if line.strip()][: a.prompts]
    prompts = sorted((build_prompt_ids(base.tokenizer, [{"role": "user", "content": t}]) for t in turns), key=len)
    pad, eos = pad_id(base), base.eos_token_ids
    batched = []
    for i in range(0, len(prompts), a.batch_size):
        chunk = prompts[i : i + a.batch_size]
        batched += [r.tokens for r in generate_batch(base, chunk, [a.max_new_tokens] * len(chunk), pad, eos)]
    alone = [generate_batch(base, [p], [a.max_new_tokens], pad, eos)[0].tokens for p in prompts]
    same = sum(x == y for x, y in zip(batched, alone))
    prefix = sum(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
                 for x, y in zip(batched, alone))
    total = sum(len(y) for y in alone)
    print(json.dumps({"prompts": len(prompts), "batch_size": a.batch_size, "identical_replies": same,
                      "tokens_before_first_difference": prefix, "tokens": total,
                      "token_agreement": round(prefix / total, 4)}))


if __name__ == "__main__":
    main()
