"""The last step of scripts/gpu_corpus_train.sh: does the freshly trained draft decode losslessly, and how
much does it accept? Then one summary JSON of the whole run.

    python3 scripts/gpu_corpus_check.py --draft W/draft --device cuda --build W/build.json \
        --times W/times.txt --out OUT/summary.json

Lossless: on held-out prompts (tests/data/arena_question_head6.jsonl; the corpus holds none of them) the
draft alone (proposer ctc, every step speculative) gives the same tokens as vanilla greedy decoding of
the same base in the same dtype. fp32 is the check that must hold; bf16 is reported too (a GPU's bf16
kernels may round a wide verify pass differently from a one-token pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tests" / "data" / "arena_question_head6.jsonl"


def held_out_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows[:n]]


def check_dtype(draft: str, device: str, dtype: str, prompts: list[str], max_new_tokens: int) -> dict:
    """Speculative (the draft alone) vs vanilla greedy on each prompt, in one dtype."""
    import torch

    from ctc_drafter.decoding import CTCDrafter

    engine = CTCDrafter.from_pretrained("default", draft, device=device, dtype=dtype, proposer="ctc",
                                        adaptive=False)
    same, betas = [], []
    for p in prompts:
        spec = engine.chat(p, max_new_tokens=max_new_tokens, speculative=True)
        plain = engine.chat(p, max_new_tokens=max_new_tokens, speculative=False)
        same.append(spec.tokens == plain.tokens)
        betas.append(round(spec.mean_accept_length, 3))
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"spec_equals_vanilla": same, "beta": betas,
            "beta_mean": round(sum(betas) / len(betas), 3) if betas else None}


def epochs_of(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [{"epoch": r.get("epoch"), "train_loss": round(r["train"]["loss"], 4),
             "eval_loss": round(r["eval"]["loss"], 4) if r.get("eval") else None}
            for r in rows if r.get("event") == "epoch"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--build", help="`corpus build --json` output")
    ap.add_argument("--times", help="lines 'step seconds' written by the shell script")
    ap.add_argument("--model-sha256", help="sha256sum of the draft's model.safetensors (checks the parts' join)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch

    summary = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}
    if a.build and Path(a.build).is_file():
        lines = [ln for ln in Path(a.build).read_text().splitlines() if ln.startswith("{")]
        summary["corpus_build"] = json.loads(lines[-1]) if lines else None
    if a.times and Path(a.times).is_file():
        summary["seconds"] = {k: float(v) for k, v in (ln.split() for ln in Path(a.times).read_text().splitlines())}
    if a.model_sha256 and Path(a.model_sha256).is_file():
        summary["model_sha256"] = Path(a.model_sha256).read_text().split()[0]
    summary["epochs"] = epochs_of(Path(a.draft) / "log.jsonl")
    prompts = held_out_prompts(a.prompts)
    summary["check"] = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "proposer": "ctc"}
    for dt in a.dtypes.split(","):
        summary["check"][dt] = check_dtype(a.draft, a.device, dt, prompts, a.max_new_tokens)
    summary["lossless_fp32"] = all(summary["check"].get("float32", {}).get("spec_equals_vanilla", [False]))
    Path(a.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0 if summary["lossless_fp32"] else 1


if __name__ == "__main__":
    sys.exit(main())
