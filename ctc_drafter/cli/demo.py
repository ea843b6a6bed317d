"""`ctc-drafter demo`: the main job on the embedded default: speculative, our vanilla loop, HF `generate`,
and llama.cpp's own greedy on the same GGUF as a reference row when llama-cpp-python is installed."""

from __future__ import annotations

import sys

from .common import add_decoding_args, add_model_args, load_drafter

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
    p.add_argument("--repeats", type=int, default=1,
                   help="run each prompt this many times per engine (interleaved) and time the median run: "
                        "steadier figures on a busy machine")
    p.set_defaults(max_new_tokens=128, cpu_kernels="auto")
    p.set_defaults(func=run)


def _hf_reference(args, d, kernels_label: str):
    """HF `generate` greedy on the same base in the same dtype with stock layers: what a user runs without
    ctc-drafter."""
    from ..evaluation.hf_engine import HFEngine
    from ..models.base import load_base_model

    same = kernels_label == "stock"
    return HFEngine(d.base if same else load_base_model(args.base_model, device=args.device, dtype=args.dtype))


def _llama_reference(args, d):
    """(llama.cpp greedy on the base's GGUF with our thread count, '') or (None, the one line saying why not)."""
    import torch

    from ..errors import CTCDrafterError
    from ..evaluation.llamacpp_engine import LlamaCppEngine, gguf_for, llama_cpp_missing

    reason = llama_cpp_missing()
    if not reason and args.temperature > 0:
        reason = "it decodes greedily (--temperature 0)"
    if not reason and d.base.device.type != "cpu":
        reason = f"it runs on the CPU, the base on {d.base.device}"
    if not reason:
        try:
            return LlamaCppEngine(d.base, gguf_for(args.base_model), threads=torch.get_num_threads()), ""
        except CTCDrafterError as e:
            reason = str(e)
    return None, f"llama.cpp reference row skipped: {reason}"


def _timed_runs(engines: dict, prompt: str, kw: dict, repeats: int) -> dict:
    """Each engine answers `prompt` `repeats` times, interleaved; keeps the run of median wall time.

    The proposer forgets earlier requests before each speculative run: an n-gram memory holding the
    same prompt's earlier answer would otherwise be copied, and the figure would not be one a new
    prompt gets.
    """
    runs = {k: [] for k in engines}
    for _ in range(repeats):
        for k, (engine, extra) in engines.items():
            if extra.get("speculative") and getattr(engine, "proposer", None) is not None:
                engine.proposer.forget()
            runs[k].append(engine.chat(prompt, **kw, **extra))
    return {k: sorted(rs, key=lambda r: r.wall_s)[len(rs) // 2] for k, rs in runs.items()}


def _first_difference(toks: list[int], ref: list[int]) -> int | None:
    if toks == ref:
        return None
    return next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))


def _differences(runs: dict, own: bool = False) -> str:
    """'yes', or which texts differ from the reference and at which new token (for a bug report). The
    reference is HF generate's answer, or with `own` (a compiled backend: its int4/int8 weights are another
    model) the engine's own greedy, the vanilla loop on the same engine."""
    if own:
        at = _first_difference(runs["spec"].tokens, runs["base"].tokens)
        hf = _first_difference(runs["base"].tokens, runs["hf"].tokens)
        note = "; HF generate's fp32 answer " + ("the same" if hf is None else f"differs from new token {hf} on")
        return ("yes" if at is None else f"NO (speculative differs from the engine's own greedy at new token {at})") + note
    ref, notes = runs["hf"].tokens, []
    for k, name in (("spec", "speculative"), ("base", "vanilla")):
        at = _first_difference(runs[k].tokens, ref)
        if at is not None:
            notes.append(f"{name} differs from HF generate at new token {at}")
    return "yes" if not notes else "NO (" + "; ".join(notes) + ")"


def _llama_cell(runs: dict) -> str:
    at = _first_difference(runs["llama"].tokens, runs["hf"].tokens)
    same = "same tokens as HF generate" if at is None else f"differs from HF generate at new token {at}"
    return f" | llama.cpp greedy {runs['llama'].tokens_per_s:6.1f} tok/s ({same})"


def run(args) -> int:
    import torch

    if args.repeats < 1:
        from ..errors import CTCDrafterError

        raise CTCDrafterError(f"--repeats must be >= 1, got {args.repeats}")
    d, kernels = load_drafter(args, args.draft_model)
    kw = dict(template=args.template, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    label = ("UNTRAINED draft (random init: expect little or no speedup)" if not d.draft_trained
             else "shipped trained draft" if args.draft_model == "default" else f"trained draft {args.draft_model}")
    dtype = str(d.base.dtype).replace("torch.", "")
    print(f"base {d.base.name} on {d.base.device} ({dtype}, {torch.get_num_threads()} threads); {label}; {d.label()}")
    print(kernels.describe())
    hf = _hf_reference(args, d, kernels.label)
    llama, skipped = _llama_reference(args, d)
    engines = {"spec": (d, {"speculative": True}), "base": (d, {"speculative": False}), "hf": (hf, {})}
    if llama is not None:
        engines["llama"] = (llama, {})
        print(f"reference: {llama.label()}, the same prompt tokens")
    else:
        print(skipped)
    for e in (d, hf) + ((llama,) if llama is not None else ()):
        e.chat("Hi", **{**kw, "max_new_tokens": 8})  # warm-up: first calls pay one-off costs
    own = args.backend != "torch"  # lossless against the compiled engine's own greedy, not HF's fp32 model
    tot = {k: [0, 0.0, 0] for k in engines}
    identical, ratios = 0, []
    for i, prompt in enumerate(PROMPTS, 1):
        runs = _timed_runs(engines, prompt, kw, args.repeats)
        same = runs["spec"].tokens == runs["base"].tokens and (own or runs["base"].tokens == runs["hf"].tokens)
        identical += same
        for k, r in runs.items():
            tot[k][0] += r.new_tokens
            tot[k][1] += r.wall_s
            tot[k][2] += r.steps
        spec, tps = runs["spec"], {k: r.tokens_per_s for k, r in runs.items()}
        ratios.append(tps["spec"] / tps["hf"])
        print(f"\n[{i}] {prompt}\n{spec.text.strip()}\n"
              f"    speculative {tps['spec']:6.1f} tok/s, {spec.mean_accept_length:.2f} tokens/step"
              f"{f' ({spec.arms_label()})' if spec.arms_label() else ''} | "
              f"vanilla {tps['base']:6.1f} | HF generate {tps['hf']:6.1f} | "
              f"speedup {tps['spec'] / tps['base']:.2f}x vs vanilla, {ratios[-1]:.2f}x vs HF generate | "
              f"identical: {_differences(runs, own)}" + (_llama_cell(runs) if "llama" in runs else ""))
    tps = {k: v[0] / v[1] for k, v in tot.items()}
    print(f"\nall prompts ({dtype}, kernels {kernels.label}"
          + (f", median of {args.repeats} runs each" if args.repeats > 1 else "") + "): "
          f"speculative {tps['spec']:.1f} tok/s, vanilla {tps['base']:.1f} tok/s, "
          f"HF generate {tps['hf']:.1f} tok/s; speedup {tps['spec'] / tps['base']:.2f}x vs vanilla, "
          f"{tps['spec'] / tps['hf']:.2f}x vs HF generate (slowest prompt {min(ratios):.2f}x); mean accepted length "
          f"{tot['spec'][0] / tot['spec'][2]:.2f} tokens/step; identical texts {identical}/{len(PROMPTS)}"
          + (f" (speculative = {args.backend}'s own greedy)" if own else ""))
    if "llama" in tps:
        print(f"reference {llama.label()}: {tps['llama']:.1f} tok/s; speculative / llama.cpp "
              f"{tps['spec'] / tps['llama']:.2f}x, HF generate / llama.cpp {tps['hf'] / tps['llama']:.2f}x")
    if not d.draft_trained:
        print("note: the draft is untrained; train one with `ctc-drafter distill` + `ctc-drafter train`", file=sys.stderr)
    return 0
