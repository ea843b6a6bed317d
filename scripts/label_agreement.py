"""How far distilled labels made in one dtype are the base's own in another (e.g. bf16 data, fp32 base).

    OMP_NUM_THREADS=1 python scripts/label_agreement.py --data DISTILL_FOLDER [--dtype float32] [--limit 64]

Reads the folder's shards, runs the base (in --dtype) teacher-forced over each stored sequence, and
compares on the trained positions: its greedy next token against the stored target, and (when the folder
has --save-hidden states) its last hidden state against the stored one (cosine, relative L2). A draft
trained on the folder learns the stored targets from the stored states; this says how much of that
differs from what the base would give it at run time in --dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ctc_drafter.data.shards import read_manifest, read_shard
from ctc_drafter.models import load_base_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--limit", type=int, default=64, help="sequences to check")
    a = ap.parse_args()
    manifest = read_manifest(a.data)
    base = load_base_model(a.base_model, device="cpu", dtype=a.dtype)
    same = total = 0
    cos, rel = [], []
    done = 0
    for shard in manifest["shards"]:
        for seq in read_shard(f"{a.data}/{shard['file']}"):
            if done >= a.limit:
                break
            hidden, logits = base.forward(seq.input_ids[None], None)  # [1,T,d], [1,T,V]
            m = seq.loss_mask
            same += int((logits[0].argmax(-1)[m] == seq.targets[m]).sum())
            total += int(m.sum())
            if seq.hidden is not None:
                h, s = hidden[0][m].float(), seq.hidden[m].float()
                cos += torch.nn.functional.cosine_similarity(h, s, dim=-1).tolist()
                rel += ((h - s).norm(dim=-1) / h.norm(dim=-1)).tolist()
            done += 1
    out = {"data": a.data, "data_dtype": manifest.get("dtype"), "base_dtype": a.dtype, "sequences": done,
           "positions": total, "target_agreement": round(same / max(total, 1), 5)}
    if cos:
        out |= {"hidden_cosine_median": round(statistics.median(cos), 6), "hidden_cosine_min": round(min(cos), 6),
                "hidden_rel_l2_median": round(statistics.median(rel), 6)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
