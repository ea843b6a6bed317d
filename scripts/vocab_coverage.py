"""How much of a text a draft can propose: the share of answer tokens inside its proposal vocabulary.

    python scripts/vocab_coverage.py runs/bench/mt_bench/vanilla.jsonl runs/bench/gsm8k/vanilla.jsonl \
        [--draft-model default]

Reads the token ids that `ctc-drafter eval` stores per turn. A token outside the draft's list
(`--draft-vocab`) can still be emitted by the base, but never drafted, so 1 - coverage is the share
of positions where the first drafted token is certain to miss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    from ctc_drafter.draft import SHIPPED_DRAFT, load_draft_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="+", help="answer files of `ctc-drafter eval` (with token ids)")
    ap.add_argument("--draft-model", default="default")
    a = ap.parse_args()
    folder = SHIPPED_DRAFT if a.draft_model == "default" else Path(a.draft_model)
    draft = load_draft_folder(folder)
    if draft.vocab_ids is None:
        print(f"{folder}: proposes from the whole vocabulary (coverage 100%)")
        return
    listed = set(draft.vocab_ids.tolist())
    print(f"{folder}: proposal vocabulary of {len(listed)} tokens")
    for path in a.answers:
        n = inside = 0
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            for choice in json.loads(line)["choices"]:
                for turn in choice.get("tokens") or []:
                    n += len(turn)
                    inside += sum(t in listed for t in turn)
        print(f"{path}: {inside}/{n} answer tokens inside ({100 * inside / max(n, 1):.1f}%)")


if __name__ == "__main__":
    main()
