"""`ctc-drafter demo`: the main job on the embedded default, with speculation and without."""

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
    p = sub.add_parser("demo", help="compare speculative and vanilla decoding on built-in prompts")
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=128)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..decoding import CTCDrafter

    d = CTCDrafter.from_pretrained(args.base_model, args.draft_model, device=args.device, dtype=args.dtype,
                                   generator=args.generator, budget=args.budget,
                                   cpu_kernels=args.cpu_kernels)
    kw = dict(template=args.template, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    label = "shipped trained draft" if d.draft_trained else "UNTRAINED draft (no trained draft ships yet)"
    print(f"base {d.base.name} on {d.base.device} ({str(d.base.dtype).replace('torch.', '')}); {label}; "
          f"generator {d.candidates.name}, node budget {d.candidates.budget}")
    d.chat("Hi", **{**kw, "max_new_tokens": 8})  # warm-up: first calls pay one-off costs
    tot = {"spec": [0, 0.0, 0], "base": [0, 0.0, 0]}
    identical = 0
    for i, prompt in enumerate(PROMPTS, 1):
        spec = d.chat(prompt, speculative=True, **kw)
        base = d.chat(prompt, speculative=False, **kw)
        same = spec.tokens == base.tokens
        identical += same
        for k, r in (("spec", spec), ("base", base)):
            tot[k][0] += r.new_tokens
            tot[k][1] += r.wall_s
            tot[k][2] += r.steps
        print(f"\n[{i}] {prompt}\n{spec.text.strip()}\n"
              f"    speculative {spec.tokens_per_s:6.1f} tok/s, {spec.mean_accept_length:.2f} tokens/step | "
              f"vanilla {base.tokens_per_s:6.1f} tok/s | speedup {spec.tokens_per_s / base.tokens_per_s:.2f}x | "
              f"identical: {'yes' if same else 'NO'}")
    s_tps = tot["spec"][0] / tot["spec"][1]
    b_tps = tot["base"][0] / tot["base"][1]
    print(f"\nall prompts: speculative {s_tps:.1f} tok/s, vanilla {b_tps:.1f} tok/s, speedup {s_tps / b_tps:.2f}x, "
          f"mean accepted length {tot['spec'][0] / tot['spec'][2]:.2f} tokens/step, "
          f"identical texts {identical}/{len(PROMPTS)}")
    if not d.draft_trained:
        print("note: the draft is untrained; train one with `ctc-drafter distill` + `ctc-drafter train`", file=sys.stderr)
    return 0
