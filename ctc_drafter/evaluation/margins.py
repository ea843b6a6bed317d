"""Why two greedy runs differ: the base model's logit margin at each first divergence.

Greedy speculative decoding verifies a tree in one pass where vanilla decoding feeds one token at a
time; both are exact in real arithmetic but sum in different orders in floating point. So an answer
may only diverge where the base's top two logits (nearly) tie. This re-runs the base on the shared
prefix (the question's earlier turns with the baseline's answers, then the common tokens of the
diverging turn) and reports the top-2 margin and the gap between the two tokens the runs chose.
"""

from __future__ import annotations

import torch

from ..errors import CTCDrafterError
from .questions import load_questions


@torch.no_grad()
def divergence_margins(base, report: dict, question_file: str) -> list[dict]:
    """For each token-level divergence of a `build_report` result: {question_id, turn, index, spec_token,
    baseline_token, top2_margin, chosen_gap} (logits of one full base pass over the shared prefix)."""
    from ..models.templates import build_prompt_ids
    from .report import load_answer_file

    divergences = report["divergences"]
    if not divergences:
        return []
    spec_records = {str(r["question_id"]): r for r in load_answer_file(report["spec_file"], "speculative").records.values()}
    base_records = {str(r["question_id"]): r for r in load_answer_file(report["baseline_file"], "baseline").records.values()}
    bench = report.get("bench") or "mt_bench"
    template = (report["meta"]["spec"] or {}).get("template") or "auto"
    questions = {str(q.question_id): q for q in load_questions(question_file, bench)}
    out = []
    for d in divergences:
        qid = str(d["question_id"])
        if d.get("by") != "token" or d.get("index") is None:
            out.append({"question_id": d["question_id"], "turn": d["turn"], "skipped": "no token ids to compare"})
            continue
        q = questions.get(qid)
        if q is None:
            raise CTCDrafterError(f"question {qid} is not in {question_file}")
        c, j, k = d["choice"], d["turn"], d["index"]
        sb = base_records[qid]["choices"][c]
        ss = spec_records[qid]["choices"][c]
        messages = []
        for i in range(j):  # earlier turns are identical in both runs
            messages += [{"role": "user", "content": q.turns[i]}, {"role": "assistant", "content": sb["turns"][i]}]
        messages.append({"role": "user", "content": q.turns[j]})
        base_ids, spec_ids = sb["tokens"][j], ss["tokens"][j]
        if k >= len(base_ids) or k >= len(spec_ids):  # one answer is a prefix of the other (stopped early)
            out.append({"question_id": d["question_id"], "turn": j, "index": k, "skipped": "length differs only"})
            continue
        ids = build_prompt_ids(base.tokenizer, messages, template) + list(base_ids[:k])
        _, logits = base.forward(torch.tensor([ids], device=base.device), None, logits_at=slice(-1, None))
        lg = logits[0, -1].float()
        top = lg.topk(2).values
        a, b = int(spec_ids[k]), int(base_ids[k])
        out.append({"question_id": d["question_id"], "turn": j, "index": k, "spec_token": a, "baseline_token": b,
                    "top2_margin": float(top[0] - top[1]), "chosen_gap": float(abs(lg[a] - lg[b])),
                    "baseline_is_top1": int(lg.argmax()) == b})  # False: the rebuilt prompt is not the run's
    return out
