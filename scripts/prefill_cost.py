"""How fast each engine reads a prompt (issue 33): the prefill alone, on the first turns of a question file.

    python scripts/prefill_cost.py --question-file heldout24.jsonl [--engines backend-int4,torch,llama-q4_1]
        [--threads 1] [--reps 3] [--base-model default]

In a bench of 128 new tokens a request's time is its prefill plus its decode steps, so a slow prefill costs
every method on that engine alike. Engines: backend-int4 / backend-int8 (`--backend compiled-int4|int8`:
the static engine's prefill, models/compiled_base.py), torch (the eager base as `--backend torch` loads it)
and llama-q4_1 (llama.cpp's `eval` of the prompt on the embedded Q4_1 GGUF, llama-cpp-python). Prompts are
the first turns in the tokenizer's chat template; each prompt runs every engine in turn (--reps times, the
median kept), so load from other processes hits them alike. Prints, per engine, prompt tokens per second over
all prompts and the median per prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

ENGINES = ("backend-int4", "backend-int8", "torch", "llama-q4_1")


def prompts(path: str, tokenizer, limit: int | None) -> list[list[int]]:
    from ctc_drafter.errors import CTCDrafterError

    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                turns = json.loads(line).get("turns") or []
                if turns:
                    ids = tokenizer.apply_chat_template([{"role": "user", "content": turns[0]}],
                                                        add_generation_prompt=True, tokenize=True)
                    out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    if not out:
        raise CTCDrafterError(f"{path} holds no question with turns")
    return out[:limit]


def make_engines(names, base_model: str, threads: int) -> dict:
    """name -> prefill(ids: list[int]) (one prompt read from an empty cache)."""
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.kv_cache import new_kv_cache

    out = {}
    for name in names:
        if name.startswith("backend-"):
            from ctc_drafter.models.compiled_base import compile_base

            b = compile_base(load_base_model(base_model, device="cpu", dtype=torch.float32), f"compiled-{name[8:]}")
        elif name == "torch":
            b = load_base_model(base_model, device="cpu")
        else:
            from ctc_drafter.evaluation.llamacpp_engine import LlamaCppEngine, gguf_for

            eng = LlamaCppEngine(load_base_model(base_model, device="cpu"), gguf_for(base_model), threads)

            def run(ids, llm=eng.llm):
                llm.reset()
                llm.eval(ids)
            out[name] = run
            continue

        def run(ids, b=b):
            with torch.no_grad():
                b.forward(torch.tensor([ids]), new_kv_cache(b), logits_at=slice(-1, None))
        out[name] = run
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--engines", default="backend-int4,torch,llama-q4_1")
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    a = ap.parse_args(argv)
    names = a.engines.split(",")
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    torch.set_num_threads(a.threads)
    from ctc_drafter.models import load_base_model

    ids = prompts(a.question_file, load_base_model(a.base_model, device="cpu").tokenizer, a.limit)
    engines = make_engines(names, a.base_model, a.threads)
    secs = {n: [] for n in names}
    for p in ids:
        for run in engines.values():  # a warm-up of this prompt's length
            run(p)
        times = {n: [] for n in names}
        for _ in range(a.reps):
            for n, run in engines.items():
                t = time.perf_counter()
                run(p)
                times[n].append(time.perf_counter() - t)
        for n in names:
            secs[n].append(statistics.median(times[n]))
    total = sum(len(p) for p in ids)
    print(f"{len(ids)} prompts, {total} tokens ({min(map(len, ids))}-{max(map(len, ids))} each), "
          f"{a.threads} thread(s), median of {a.reps}")
    print("| engine | prompt tokens/s (all prompts) | median ms per prompt |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {total / sum(secs[n]):.0f} | {statistics.median(secs[n]) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
