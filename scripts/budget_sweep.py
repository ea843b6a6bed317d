"""Choose the proposer and node budget: beta and tokens/s against tree size, on prompts that are not benchmarks.

    python scripts/budget_sweep.py --draft-model default [--proposers ctc,ngram,hybrid] [--budgets 4,8,12,16,24,32] \
        [--prompts 6] [--generator beam] [--cpu-kernels packed|stock] [--backend compiled-int4] [--switch]

Each proposer x budget starts from a fresh proposer (the n-gram memory fills over its own prompts only).
Uses the LAST --prompts questions (or every --every-th) of ../shared/data/arena/question.jsonl (the distillation run that
trained the shipped draft used only the first few hundred), greedy, --max-new-tokens each, and our
vanilla loop as the reference speed, all in one process on one machine.
"""

import argparse
import json
from pathlib import Path

from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.decoding.proposers import ARProposer, make_proposer

ARENA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "question.jsonl"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--draft-model", default="default")
    ap.add_argument("--budgets", default="4,8,12,16,24,32")
    ap.add_argument("--generator", default="beam")
    ap.add_argument("--proposers", default="ctc",
                    help="comma-separated: ctc, ngram, hybrid, and hybrid-sized (the hybrid sizing each step's tree "
                         "by this machine's measured pass cost, up to the budget)")
    ap.add_argument("--every", type=int, default=0, help="take every K-th question instead of the last --prompts")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--questions", default=str(ARENA))
    ap.add_argument("--cpu-kernels", default="packed", choices=["packed", "stock"])
    ap.add_argument("--backend", default="torch", help="torch or a compiled backend (compiled-int4, ...)")
    ap.add_argument("--switch", action="store_true",
                    help="let the speculation switch choose each step (as the defaults do) instead of always drafting")
    ap.add_argument("--min-path-probs", default=None,
                    help="an autoregressive draft: comma-separated cut-offs for its levels (ARProposer "
                         "min_path_prob, 0 = all levels), each its own row; default: the proposer's")
    a = ap.parse_args()
    qs = [json.loads(line)["turns"][0] for line in Path(a.questions).read_text().split("\n") if line.strip()]
    qs = qs[:: a.every][: a.prompts] if a.every else qs[-a.prompts:]
    d = CTCDrafter.from_pretrained(a.base_model, a.draft_model, cpu_kernels=a.cpu_kernels, backend=a.backend,
                                   adaptive=a.switch)  # by default every step speculates: beta is the tree's
    d.chat("Hi", max_new_tokens=8)  # warm-up
    rows = []

    def run(label, speculative):
        tok = wall = steps = 0
        for q in qs:
            r = d.chat(q, max_new_tokens=a.max_new_tokens, speculative=speculative)
            tok, wall, steps = tok + r.new_tokens, wall + r.wall_s, steps + r.steps
        rows.append({"method": label, "tokens_per_s": tok / wall, "beta": tok / steps})
        print(json.dumps(rows[-1]), flush=True)

    run("vanilla", False)
    cuts = [float(x) for x in a.min_path_probs.split(",")] if a.min_path_probs else [None]
    for name in a.proposers.split(","):
        for b in [int(x) for x in a.budgets.split(",")]:
            for cut in cuts if name != "ngram" else [None]:
                cost = d.kernel_report.cost.pass_ms if name == "hybrid-sized" else None
                d.proposer, d.budget = make_proposer(name.replace("-sized", ""), d.draft, a.generator, cost_ms=cost), b
                if hasattr(d.base, "warm"):
                    d.base.warm(b)  # a compiled backend: this budget's pass sizes compile before the timing
                label = f"{name} {a.generator if name != 'ngram' else ''} budget {b}".replace("  ", " ")
                if cut is not None:
                    for part in getattr(d.proposer, "parts", [d.proposer]):
                        if isinstance(part, ARProposer):
                            part.min_path_prob = cut
                    label += f" min-path-prob {cut:g}"
                run(label, True)
    van = rows[0]["tokens_per_s"]
    print(f"\n| method | beta | tokens/s | speedup vs vanilla |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['beta']:.2f} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / van:.2f}x |")


if __name__ == "__main__":
    main()
