"""How diverse a question file's prompts are: distinct n-grams, duplicates, length.

    python scripts/prompt_diversity.py FILE [FILE ...] [--sample N] [--json]

Per file (its first user turns; the first --sample of them, so that files of different sizes are
compared at the same size: distinct-n falls as a corpus grows):
  distinct-n      unique word n-grams / all word n-grams over the prompts (lower-cased words), n = 1, 2, 3
  exact dup       share of prompts whose normalised text (lower case, spaces collapsed) came earlier
  near dup        share of prompts with an earlier one at character 5-gram Jaccard >= 0.7 (what make-prompts drops)
  words           mean and median words per prompt
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from ctc_drafter.data.conversations import iter_conversations
from ctc_drafter.data.near_duplicates import NearDuplicateIndex


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def distinct(prompts: list[str], n: int) -> float:
    grams = [tuple(w[i : i + n]) for w in map(words, prompts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_rates(prompts: list[str]) -> tuple[float, float]:
    seen, exact, near = set(), 0, 0
    index = NearDuplicateIndex(0.7)
    for p in prompts:
        key = re.sub(r"\s+", " ", p.lower()).strip()
        exact += key in seen
        seen.add(key)
        near += index.add(p) is not None
    return exact / len(prompts), near / len(prompts)


def describe(path: str, sample: int | None) -> dict:
    prompts = [c.users[0] for c in iter_conversations([Path(path)]) if c.users and c.users[0].strip()][:sample]
    exact, near = duplicate_rates(prompts)
    lengths = [len(p.split()) for p in prompts]
    return {"file": path, "prompts": len(prompts), **{f"distinct_{n}": round(distinct(prompts, n), 4) for n in (1, 2, 3)},
            "exact_dup": round(exact, 4), "near_dup": round(near, 4), "mean_words": round(statistics.mean(lengths), 1),
            "median_words": statistics.median(lengths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--sample", type=int, default=None, help="use the first N prompts of each file")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = [describe(f, a.sample) for f in a.files]
    if a.json:
        print(json.dumps(rows))
        return
    print("| file | prompts | distinct-1 | distinct-2 | distinct-3 | exact dup | near dup | words (mean / median) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['prompts']} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['distinct_3']:.3f} "
              f"| {100 * r['exact_dup']:.1f} % | {100 * r['near_dup']:.1f} % | {r['mean_words']} / {r['median_words']} |")


if __name__ == "__main__":
    main()
