"""Beta of drafts replayed against recorded greedy answers: the tokens each step of a greedy speculative
decode would accept, without the decode's tree passes.

    python scripts/replay_beta.py --answers runs/bench/hf-generate.jsonl \
        --question-file ../shared/data/arena/question.jsonl --question-begin 871 \
        --draft cw0.01=runs/sweep/cw0.01 --draft cw0=runs/sweep/cw0 --ctc-transform on,off \
        --out runs/replay [--check runs/bench]

Why: greedy verification accepts the longest tree path equal to the base's own greedy continuation, so
given that continuation (an answer file of HF `generate`, greedy) and the base's hidden states along it
(one teacher-forced pass per turn), each step's tree and accepted length follow with the engine's own
proposer, budget and tree check, without verifying the tree: on a CPU a 64-node tree pass is most of a
step's time. The draft reads the hidden states the loop would hand it (the accepted positions'); they
come from one full pass instead of the loop's tree passes, so a tree can differ where float rounding
flips a draft's top-k; `--check DIR` counts the turns whose accepted lengths equal a real decode's
(DIR/<name>.jsonl, e.g. a scripts/benchmark.py --ctc-ab run). Writes <name>.jsonl per draft and transform
(NAME-on, NAME-off: the fields scripts/paired_ratio.py reads) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctc_drafter.cli.common import CTC_TRANSFORM
from ctc_drafter.decoding import SpeculativeDecoder
from ctc_drafter.decoding.state import DecodeState
from ctc_drafter.decoding.tree import TokenTree
from ctc_drafter.draft import load_draft
from ctc_drafter.evaluation.answer_files import method_records
from ctc_drafter.evaluation.questions import load_questions
from ctc_drafter.models.base import load_base_model
from ctc_drafter.models.templates import build_prompt_ids


def accepted(tree: TokenTree, continuation: list[int]) -> int:
    """Draft tokens greedy verification accepts: the longest root path equal to the continuation's start."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        children.setdefault(p, []).append(i)
    node = n = 0
    while n < len(continuation):
        node = next((c for c in children.get(node, []) if tree.tokens[c] == continuation[n]), None)
        if node is None:
            break
        n += 1
    return n


@torch.no_grad()
def base_pass(base, prompt: list[int], answer: list[int]) -> tuple[torch.Tensor, int]:
    """hidden [1, P+A-1, d] along prompt + answer (position i's next token is token i+1), and how many
    answer tokens are not the base's argmax after the tokens before them (0: the answer is greedy)."""
    ids = torch.tensor([prompt + answer[:-1]], device=base.device)
    P = len(prompt)
    hidden, logits = base.forward(ids, None, logits_at=slice(P - 1, ids.shape[1]))
    return hidden, sum(a != b for a, b in zip(logits[0].argmax(-1).tolist(), answer))


def memo_levels(draft) -> dict:
    """Cache the draft's level rows by the accepted length they were drafted from (one turn's memo; clear
    it per turn): on one recorded answer every transform reaches the same positions with the same
    accepted prefix, so the rows repeat and each is drafted once."""
    memo: dict = {}
    levels = draft.levels

    def cached(f_last, cache, n=None, min_path_prob=0.0):
        key = (cache.length, n)
        if key not in memo:
            memo[key] = levels(f_last, cache, n, min_path_prob)
        return memo[key]

    draft.levels = cached
    return memo


def replay_turn(drafter: SpeculativeDecoder, prompt: list[int], answer: list[int], hidden: torch.Tensor,
                max_new_tokens: int) -> list[int]:
    """Accepted tokens per pass (the prefill's 1 first), as `generate` records them."""
    state = DecodeState(prompt, answer[0], hidden[:, : len(prompt)])
    drafter.proposer.start(state)
    lengths = [1]
    while state.num_new < len(answer):
        remaining = max_new_tokens - state.num_new
        tree = drafter.propose(state, max_depth=remaining - 1)
        cont = answer[state.num_new:]
        new = cont[: accepted(tree, cont) + 1][:remaining]
        r = len(state.tokens) - 1  # the root's position
        state.append(new, hidden[:, r: r + len(new)])
        lengths.append(len(new))
    drafter.proposer.finish(state)
    return lengths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", required=True, help="greedy answer file (HF generate) whose tokens are replayed")
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--bench", default="mt_bench")
    ap.add_argument("--question-begin", type=int, default=None)
    ap.add_argument("--question-end", type=int, default=None)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--dtype", default=None, help="the base's dtype (default: the answers')")
    ap.add_argument("--draft", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--ctc-transform", default="on,off", help="comma-separated: on, off, auto")
    ap.add_argument("--budget", type=int, default=None, help="tree nodes per step (default: the device's)")
    ap.add_argument("--tree-policy", default=None, help="beam, medusa, prefix (default: the device's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", default=None, metavar="DIR", help="real decodes' answer files to compare with")
    a = ap.parse_args()
    questions = load_questions(a.question_file, a.bench, a.question_begin, a.question_end)
    records = {str(r["question_id"]): r for r in method_records([Path(a.answers).parent], Path(a.answers).stem)}
    meta = next(iter(records.values()))["meta"]
    base = load_base_model(a.base_model, device="cpu", dtype=a.dtype or meta["dtype"])
    tok = base.tokenizer
    max_new = int(meta["max_new_tokens"])
    drafters, memos = {}, []
    for spec in a.draft:
        name, path = spec.split("=", 1)
        draft, _ = load_draft(path, base, quiet=True)
        memos.append(memo_levels(draft))
        for mode in a.ctc_transform.split(","):
            drafters[f"{name}-{mode}"] = SpeculativeDecoder(base, draft, proposer="ctc", budget=a.budget,
                                                            tree_policy=a.tree_policy,
                                                            ctc_transform=CTC_TRANSFORM[mode])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {n: [] for n in drafters}
    not_greedy = turns = 0
    for q in questions:
        rec = records.get(str(q.question_id))
        if rec is None:
            continue
        c = rec["choices"][0]
        messages, per = [], {n: [] for n in drafters}
        for j, user in enumerate(q.turns):
            messages.append({"role": "user", "content": user})
            prompt = build_prompt_ids(tok, messages, meta.get("template") or "auto")
            answer = c["tokens"][j]
            messages.append({"role": "assistant", "content": c["turns"][j]})
            hidden, bad = base_pass(base, prompt, answer)
            not_greedy += bool(bad)
            for m in memos:
                m.clear()
            turns += 1
            for n, d in drafters.items():
                per[n].append(replay_turn(d, prompt, answer, hidden, max_new))
        for n in drafters:
            results[n].append({"question_id": q.question_id, "model_id": n,
                               "choices": [{"index": 0, "accept_lengths": per[n],
                                            "new_tokens": [sum(t) - 1 for t in per[n]]}]})
        print(f"question {q.question_id}: done", flush=True)
    print(f"\n{turns} turns replayed; {not_greedy} whose recorded answer is not the full pass's argmax everywhere")
    print("\n| draft and transform | beta (tokens / base passes, prefill included) | turns equal to the real decode |")
    print("|---|---|---|")
    for n, recs in results.items():
        (out / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        toks = sum(sum(sum(t) for t in r["choices"][0]["accept_lengths"]) for r in recs)
        steps = sum(sum(len(t) for t in r["choices"][0]["accept_lengths"]) for r in recs)
        same = "-"
        real_file = Path(a.check or "") / f"{n}.jsonl"
        if a.check and real_file.exists():
            real = {str(r["question_id"]): r["choices"][0]["accept_lengths"] for r in method_records([Path(a.check)], n)}
            pairs = [(t, real[str(r["question_id"])][j]) for r in recs if str(r["question_id"]) in real
                     for j, t in enumerate(r["choices"][0]["accept_lengths"])]
            same = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
        print(f"| {n} | {toks / steps:.3f} | {same} |")


if __name__ == "__main__":
    main()
