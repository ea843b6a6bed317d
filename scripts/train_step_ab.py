"""One AR training step, sampled positions against every position, on the same batches in one process.

    OMP_NUM_THREADS=1 python scripts/train_step_ab.py --data DIR [--batches 10] [--positions 32]

Loads a distilled folder (stored hidden states), builds the shipped draft's recipe (AR head, no CTC
term, label window 4, proposal vocabulary 8192, bf16 autocast) and times forward + backward of
`batch_losses` on batches of 4 sequences, alternating the sampled path (`--positions` per sequence,
what `train --positions P` runs) and every position (`train --positions all`), each after a warm-up
step. Prints the median trained positions per second of each and their ratio. Steadier than whole
runs on a shared machine: both paths see the same batches under the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ctc_drafter.draft import new_ar_draft_for
from ctc_drafter.models.base import load_base_model
from ctc_drafter.training.data import HiddenReader, load_sequences, make_batch, most_frequent_targets, sample_positions
from ctc_drafter.training.evaluate import batch_losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--positions", type=int, default=32)
    args = p.parse_args()
    base = load_base_model("default", device="cpu", dtype="bfloat16")
    draft = new_ar_draft_for(base, seed=0, label_len=4, loss="ce", draft_vocab=8192,
                             extra={"ar_loss_weights": {"feature": 1.0, "token": 0.1, "ctc": 0.0}}).float()
    seqs, _ = load_sequences([args.data], base, 4, 2048)
    draft.set_vocab(most_frequent_targets(seqs, 8192))
    reader, to_sym = HiddenReader(), draft.token_to_symbol()

    def step(batch) -> tuple[float, int]:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, _ = batch_losses(draft, batch.hidden, batch, to_sym, "ce", draft.config)
        lp.total.backward()
        draft.zero_grad(set_to_none=True)
        return time.perf_counter() - t, lp.num_positions

    rates = {"sampled": [], "every": []}
    stride = max(4, len(seqs) // args.batches)
    for i in range(args.batches):
        group = seqs[i * stride: i * stride + 4]
        for name, pos in (("sampled", [sample_positions(s, args.positions, 0, 1) for s in group]),
                          ("every", [None] * len(group))):
            batch = make_batch(group, pos, 4, reader)
            step(batch)  # warm-up: allocations
            dt, n = step(batch)
            rates[name].append(n / dt)
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    print(json.dumps({"positions_per_s_median": med, "ratio": round(med["every"] / med["sampled"], 2),
                      "per_batch": {k: [round(x) for x in v] for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
