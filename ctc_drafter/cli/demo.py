"""`ctc-drafter demo`: the main job on the embedded default: speculative, our vanilla loop, HF `generate`."""

from __future__ import annotations

import sys

from .common import add_decoding_args, add_model_args

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short Python function that returns the factorial of n.",
    # not from any dataset: the shipped draft was distilled on GSM8K *train* questions
    "A baker makes 36 muffins in the morning and half as many in the afternoon. She sells 40 of them. "
    "How many muffins are left?",
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="compare speculative decoding with vanilla and HF generate on built-in prompts")
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=128)
    p.set_defaults(func=run)


def _hf_reference(args, d):
    """HF `generate` greedy on the base as loaded, stock layers: what a user runs without ctc-drafter."""
    from ..evaluation.hf_engine import HFEngine
    from ..models.base import load_base_model

    base = d.base if d.kernels == "stock" else load_base_model(args.base_model, device=args.device, dtype=args.dtype)
    return HFEngine(base)


def run(args) -> int:
    from ..decoding import CTCDrafter

    d = CTCDrafter.from_pretrained(args.base_model, args.draft_model, device=args.device, dtype=args.dtype,
                                   generator=args.generator, budget=args.budget,
                                   cpu_kernels=args.cpu_kernels)
    kw = dict(template=args.template, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    label = "shipped trained draft" if d.draft_trained else "UNTRAINED draft (no trained draft ships yet)"
    print(f"base {d.base.name} on {d.base.device} ({str(d.base.dtype).replace('torch.', '')}); {label}; "
          f"generator {d.candidates.name}, node budget {d.candidates.budget}"
          + ("; oneDNN packed linear layers" if d.kernels == "packed" else ""))
    hf = _hf_reference(args, d)
    for e in (d, hf):
        e.chat("Hi", **{**kw, "max_new_tokens": 8})  # warm-up: first calls pay one-off costs
    tot = {k: [0, 0.0, 0] for k in ("spec", "base", "hf")}
    identical = 0
    for i, prompt in enumerate(PROMPTS, 1):
        runs = {"spec": d.chat(prompt, speculative=True, **kw), "base": d.chat(prompt, speculative=False, **kw),
                "hf": hf.chat(prompt, **kw)}
        same = runs["spec"].tokens == runs["base"].tokens == runs["hf"].tokens
        identical += same
        for k, r in runs.items():
            tot[k][0] += r.new_tokens
            tot[k][1] += r.wall_s
            tot[k][2] += r.steps
        spec, tps = runs["spec"], {k: r.tokens_per_s for k, r in runs.items()}
        print(f"\n[{i}] {prompt}\n{spec.text.strip()}\n"
              f"    speculative {tps['spec']:6.1f} tok/s, {spec.mean_accept_length:.2f} tokens/step | "
              f"vanilla {tps['base']:6.1f} | HF generate {tps['hf']:6.1f} | "
              f"speedup {tps['spec'] / tps['base']:.2f}x vs vanilla, {tps['spec'] / tps['hf']:.2f}x vs HF generate | "
              f"identical: {'yes' if same else 'NO'}")
    tps = {k: v[0] / v[1] for k, v in tot.items()}
    print(f"\nall prompts: speculative {tps['spec']:.1f} tok/s, vanilla {tps['base']:.1f} tok/s, "
          f"HF generate {tps['hf']:.1f} tok/s; speedup {tps['spec'] / tps['base']:.2f}x vs vanilla, "
          f"{tps['spec'] / tps['hf']:.2f}x vs HF generate; mean accepted length "
          f"{tot['spec'][0] / tot['spec'][2]:.2f} tokens/step; identical texts {identical}/{len(PROMPTS)}")
    if not d.draft_trained:
        print("note: the draft is untrained; train one with `ctc-drafter distill` + `ctc-drafter train`", file=sys.stderr)
    return 0
