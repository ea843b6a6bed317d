"""GPU check for ctc-drafter: exactness on CUDA, fp16/bf16 agreement, and step timing at Vicuna-7B/13B shapes.

Device-tool call (ONE call, fits the 8-minute budget; the script stops starting new work after
--time-budget-s, 420 s by default, and writes its JSON after every section so a timeout loses little):

    run(command="bash scripts/gpu_check.sh", timeout_s=540)

    (add carry=[".whl"] only if wheels were put in .whl/; the device image already has torch,
    transformers, accelerate and safetensors, and ctc_drafter needs nothing else at import time)

CPU smoke test (tiny shapes on the CPU, well under a minute):

    OMP_NUM_THREADS=1 python scripts/gpu_check.py --dry-run --out /tmp/gc

What it measures (all numbers go to <out>/gpu_check.json; a short table is printed LAST because the
device tool returns only the tail of the output):
  - imports:        every ctc_drafter module imports with `gguf` unavailable;
  - peak_bandwidth: device-to-device copy, the card's achievable memory bandwidth;
  - exactness_fp32: the tests/test_exactness.py comparison on the device: tiny random Llama in fp32,
                    speculative == vanilla == HF generate, token for token, both candidate generators;
  - agreement:      fp16 and bf16 toy models: share of runs / tokens where speculative == vanilla greedy,
                    and the vanilla top-2 logit margin at each divergence (near-ties flip under a
                    different kernel shape; a large margin would mean a real bug);
  - timing[7b|13b]: random fp16 Llama with Vicuna shapes, past length --past (512): HF `generate`
                    greedy per-token step, our vanilla step (decode_one_token + argmax), our
                    speculative step (draft frames + candidate tree + tree verification + accept + KV
                    compaction, then the draft's context update) for beam trees and fixed synthetic
                    trees of 16/32/64/128 nodes, the draft's own overhead (beam and medusa candidate
                    building), GPU syncs per step, tokens/s and weight bandwidth against the measured
                    peak, and the GPU's kernel-busy time per vanilla step and per 64-node verification
                    (torch.profiler): far below the step time means the machine is launch-bound;
  - targets:        spec step (64-node beam tree, draft included) <= 1.15 x HF step; our vanilla step no
                    slower than HF's (3% noise allowance); draft overhead <= 10% of HF's step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ctc_drafter.decoding import CTCDrafter, DecodeState  # noqa: E402
from ctc_drafter.decoding.proposers import CTCProposer, Proposer  # noqa: E402
from ctc_drafter.decoding.proposers.frame_trees import make_policy  # noqa: E402
from ctc_drafter.decoding.generate import TokenPicker  # noqa: E402
from ctc_drafter.models.kv_cache import compact_kv, new_kv_cache  # noqa: E402
from ctc_drafter.decoding.tree import TokenTree  # noqa: E402
from ctc_drafter.draft import CTCDraftModel, DraftConfig, new_draft_for  # noqa: E402
from ctc_drafter.models.base import BaseModel  # noqa: E402
from ctc_drafter.testing import tiny_llama  # noqa: E402 - the suite's builder (no pytest needed)

# Vicuna-7B / 13B (Llama-1/2 architecture, MHA, vocab 32000).
REAL_SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824, vocab_size=32000),
}
# --dry-run: same code paths, shapes a CPU runs in a second.
DRY_SHAPES = {
    "7b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512),
    "13b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, vocab_size=512),
}
TARGETS = {"spec64_over_hf_max": 1.15, "vanilla_over_hf_max": 1.03, "draft_overhead_max": 0.10}
# As tests/test_exactness.py (sdpa, the default) plus the eager attention back end, as test_tree_mask_exact_...
EXACT_CASES = [("beam", 12, "sdpa"), ("beam", 40, "sdpa"), ("medusa", 64, "sdpa"), ("medusa", 20, "sdpa"),
               ("medusa", 64, "eager"), ("beam", 40, "eager")]


# ---- models ------------------------------------------------------------------------------------

def random_llama(shape: dict, device: torch.device, dtype: torch.dtype, max_pos: int = 4096):
    """A random Llama built directly on `device` in `dtype` (weights never touch the CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=max_pos,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def timing_draft(base: BaseModel, seed: int = 0) -> CTCDraftModel:
    """A random draft shaped for `base`, built and initialised on the base's device.

    `new_draft_for` initialises on the CPU (seconds for 13B shapes); the weights' values do not change
    the step time, only the shapes and the tree size do (and tree sizes are recorded).
    """
    dev = base.device
    cfg = DraftConfig.from_base_config(base.config, base_model=base.name)
    with torch.device(dev):
        draft = CTCDraftModel(cfg)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name == "frame_embed":
                p.normal_(0.0, 0.5, generator=g)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return draft.to(dtype=base.dtype).eval().bind(base.model)


def release_memory():
    """Return freed blocks to the driver between models (the caller drops its references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FixedTreeProposer(Proposer):
    """A synthetic tree of exactly `budget` nodes (width chains under the root) whatever the draft says.

    Verification cost depends on the node count and the mask's shape, not on which tokens are in it,
    so this isolates tree size from what the beam search happens to produce.
    """

    name = "fixed"

    def __init__(self, budget: int, vocab_size: int, width: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randperm(vocab_size, generator=g)[:budget].tolist()  # distinct: siblings differ
        self.parents = [-1] + [max(0, i - width) for i in range(1, budget)]

    def propose(self, state, max_depth, budget):
        return TokenTree([state.root] + self.tokens[1:], list(self.parents))


# ---- timing helpers ----------------------------------------------------------------------------

class Clock:
    """Times a callable: CUDA events on a GPU (with a sync after each rep), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def times_ms(self, fn, warmup: int, reps: int, after=None) -> list[float]:
        out = []
        for i in range(warmup + reps):
            self.sync()
            if self.cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                t = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t) * 1e3
            if after is not None:
                after()  # e.g. trim the KV cache back: not part of the step
            if i >= warmup:
                out.append(ms)
        return out


def med(xs) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


def step_clock_streamer():
    """A `generate` streamer that timestamps every put: one put per decoding step (after a host sync)."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    return StepClock()


def device_busy_ms(fn, device: torch.device, reps: int, after=None) -> float | str | None:
    """GPU kernel time per call of `fn` (torch.profiler, summed over kernels), None off CUDA.

    Against the wall-clock step it separates the device's own work from host and launch overhead: a
    launch-bound machine (as the 2026-11-28 gVisor H200) shows a busy time far below the step time.
    """
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
                if after is not None:
                    after()
            torch.cuda.synchronize()
        us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                 for e in prof.key_averages())
        return round(us / reps / 1e3, 4)
    except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the section
        return f"{type(e).__name__}: {e}"[:200]


def count_syncs(fn, device: torch.device) -> int | None:
    """How many synchronising CUDA calls `fn` makes (torch's sync debug mode), None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ---- sections ----------------------------------------------------------------------------------

_IMPORT_PROBE = r"""
import importlib, json, pkgutil, sys
class BlockGguf:  # as on a machine without gguf
    def find_spec(self, name, path=None, target=None):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("gguf blocked by gpu_check")
sys.meta_path.insert(0, BlockGguf())
import ctc_drafter
names = [m.name for m in pkgutil.walk_packages(ctc_drafter.__path__, "ctc_drafter.")
         if not m.name.endswith("__main__")]  # importing __main__ would run the CLI
failed, absent = {}, {}
for n in names:
    try:
        importlib.import_module(n)
    except ModuleNotFoundError as e:
        # the server's declared dependencies are not in the GPU image (seen 2026-11-28: fastapi): not a gguf leak
        (absent if e.name in ("fastapi", "uvicorn", "prometheus_client") else failed)[n] = str(e)
    except Exception as e:
        failed[n] = f"{type(e).__name__}: {e}"
print(json.dumps({"modules": len(names), "failed": failed, "dependency_not_installed": absent}))
"""


def check_imports(a) -> dict:
    """Every ctc_drafter module must import without gguf (transformers needs it only to read GGUF files).

    In a fresh interpreter, so that nothing this script already imported hides an eager `import gguf`.
    """
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    if p.returncode != 0:
        return {"ok": False, "failed": {"ctc_drafter": p.stderr.strip()[-2000:]}}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["ok"] = not res["failed"]
    res["gguf_installed"] = importlib.util.find_spec("gguf") is not None
    return res


def peak_bandwidth(a, device) -> dict:
    """Device-to-device copy of a large buffer: bytes read + written per second (the achievable peak)."""
    n = (16 << 20) if a.dry_run else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    times = Clock(device).times_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    ms = min(times)  # the peak: best rep
    del src, dst
    release_memory()
    return {"bytes": n, "copy_ms_best": round(ms, 4), "copy_ms_median": med(times),
            "gbps": round(2 * n / (ms / 1e3) / 1e9, 1)}


def hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(base: BaseModel, ids: list[int]) -> float:
    """logit(top1) - logit(top2) of the base's next-token logits after `ids` (one prefill pass)."""
    cache = new_kv_cache(base)
    _, logits = base.forward(torch.tensor([ids], device=base.device), cache, logits_at=slice(-1, None))
    top = logits[0, -1].float().topk(2).values
    return round(float(top[0] - top[1]), 6)


@torch.no_grad()
def exactness_fp32(a, device) -> dict:
    """tests/test_exactness.py::test_speculative_equals_vanilla_equals_hf, in fp32 on `device`."""
    trials, n = (1, 12) if a.dry_run else (4, 30)
    cases, all_equal = [], True
    for generator, budget, attn in EXACT_CASES:
        model = tiny_llama(dtype=torch.float32, seed=1).to(device)
        model.set_attn_implementation(attn)
        base = BaseModel(model, None, "toy")
        g = torch.Generator().manual_seed(budget)
        runs = []
        for trial in range(trials):
            drafter = CTCDrafter(base, new_draft_for(base, seed=trial), proposer="ctc", tree_policy=generator,
                                 budget=budget)
            ids = torch.randint(0, 64, (1, int(torch.randint(1, 12, (), generator=g))), generator=g).to(device)
            spec = drafter.generate(ids, max_new_tokens=n)
            van = drafter.generate(ids, max_new_tokens=n, speculative=False)
            hf = hf_greedy(base.model, ids, n)
            ok = spec.tokens == van.tokens == hf
            run = {"equal": ok, "steps": spec.steps, "max_accept": max(spec.accept_lengths),
                   "mean_tree": round(sum(spec.tree_sizes) / max(1, len(spec.tree_sizes)), 2)}
            if not ok:
                i = first_divergence(spec.tokens, van.tokens)
                j = first_divergence(van.tokens, hf)
                run.update(spec_vs_vanilla_at=i, vanilla_vs_hf_at=j)
                k = min(x for x in (i, j) if x is not None)
                run["margin_at_divergence"] = top2_margin(base, ids[0].tolist() + van.tokens[:k])
            all_equal &= ok
            runs.append(run)
        cases.append({"generator": generator, "budget": budget, "attn": attn, "runs": runs,
                      "equal": sum(r["equal"] for r in runs), "of": len(runs)})
        del base, model, drafter
        release_memory()
    # max_accept > 1: some step accepted draft tokens, so the multi-token path was compared too.
    return {"all_equal": all_equal, "new_tokens": n, "cases": cases,
            "equal_runs": sum(c["equal"] for c in cases), "runs": sum(c["of"] for c in cases),
            "max_accept": max(r["max_accept"] for c in cases for r in c["runs"])}


@torch.no_grad()
def agreement(a, device) -> dict:
    """fp16/bf16: how often speculative greedy output equals vanilla greedy output, and margins where not."""
    prompts, n = (2, 16) if a.dry_run else (8, 48)
    toys = {"tiny": dict(vocab_size=64, hidden=32, layers=2), "small": dict(vocab_size=2048, hidden=256, layers=4)}
    out = {}
    for dname, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        runs = []
        for tname, shape in toys.items():
            base = BaseModel(tiny_llama(dtype=dtype, seed=7, **shape).to(device), None, tname)
            g = torch.Generator().manual_seed(11)
            for generator in ("beam", "medusa"):
                drafter = CTCDrafter(base, new_draft_for(base, seed=0), proposer="ctc", tree_policy=generator,
                                     budget=64)
                for p in range(prompts):
                    ids = torch.randint(0, shape["vocab_size"], (1, int(torch.randint(4, 24, (), generator=g))),
                                        generator=g).to(device)
                    spec = drafter.generate(ids, max_new_tokens=n)
                    van = drafter.generate(ids, max_new_tokens=n, speculative=False)
                    hf = hf_greedy(base.model, ids, n)
                    i = first_divergence(spec.tokens, van.tokens)
                    r = {"model": tname, "generator": generator, "identical": i is None,
                         "agree_tokens": n if i is None else i, "vanilla_equals_hf": van.tokens == hf,
                         "max_accept": max(spec.accept_lengths)}
                    if i is not None:
                        r["diverge_at"] = i
                        r["margin_at_divergence"] = top2_margin(base, ids[0].tolist() + van.tokens[:i])
                    runs.append(r)
            del base, drafter
            release_memory()
        margins = [r["margin_at_divergence"] for r in runs if "margin_at_divergence" in r]
        out[dname] = {"runs": len(runs), "identical_runs": sum(r["identical"] for r in runs),
                      "run_agreement": round(sum(r["identical"] for r in runs) / len(runs), 4),
                      "token_agreement": round(sum(r["agree_tokens"] for r in runs) / (n * len(runs)), 4),
                      "vanilla_equals_hf_runs": sum(r["vanilla_equals_hf"] for r in runs),
                      "margins_at_divergence": margins, "max_margin_at_divergence": max(margins) if margins else None,
                      "detail": runs}
    out["new_tokens"] = n
    return out


def time_hf_generate(model, ids, steps: int, device) -> dict:
    """HF `generate` greedy: median interval between streamer puts (one per step), warm-up excluded."""
    clock = Clock(device)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)  # warm-up
    st = step_clock_streamer()
    clock.sync()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, streamer=st)
    clock.sync()
    total = time.perf_counter() - t0
    # put #0 is the prompt, #1 the prefill's token; intervals after that are decoding steps.
    steps_ms = [(b - a_) * 1e3 for a_, b in zip(st.t[1:], st.t[2:])][2:]
    return {"step_ms": med(steps_ms), "step_ms_min": round(min(steps_ms), 4), "steps_timed": len(steps_ms),
            "total_s": round(total, 3)}


def weight_bytes(model) -> int:
    """Bytes a decoding step must read: every weight except the input embedding (one row is gathered)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


@torch.no_grad()
def time_shape(a, name: str, shape: dict, device, peak_gbps: float | None) -> dict:
    dtype = torch.float16
    clock = Clock(device)
    warm, reps = (1, 3) if a.dry_run else (3, a.reps)
    t0 = time.perf_counter()
    model = random_llama(shape, device, dtype, max_pos=max(4096, a.past + 512))
    clock.sync()
    res = {"shape": shape, "dtype": "float16", "past": a.past, "build_s": round(time.perf_counter() - t0, 2)}
    base = BaseModel(model, None, f"random-{name}")
    wbytes = weight_bytes(model)
    res["weight_bytes"] = wbytes
    c = model.config
    res["kv_bytes_per_step"] = 2 * c.num_hidden_layers * c.hidden_size * a.past * 2
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, c.vocab_size, (1, a.past), generator=g).to(device)

    # HF generate, greedy.
    res["hf"] = time_hf_generate(model, prompt, a.hf_steps, device)
    hf_ms = res["hf"]["step_ms"]

    # Our vanilla step: decode_one_token + argmax, the KV cache trimmed back to `past` after each rep.
    t1 = time.perf_counter()
    draft = timing_draft(base)
    clock.sync()
    res["draft_build_s"] = round(time.perf_counter() - t1, 2)
    res["draft_params"] = sum(p.numel() for p in draft.parameters())
    drafter = CTCDrafter(base, draft, proposer="ctc", tree_policy="beam", budget=64)
    picker = TokenPicker(0.0, 0, 1.0, seed=0)
    cache = new_kv_cache(base)
    hidden, logits = drafter.prefill(prompt, cache)
    root = picker.pick(logits[0])
    past = cache.get_seq_length()
    trim = lambda: compact_kv(cache, past, [])  # noqa: E731
    van = clock.times_ms(lambda: picker.pick(drafter.decode_one_token(root, cache)[0]), warm, reps, after=trim)
    res["vanilla"] = {"step_ms": med(van), "step_ms_min": round(min(van), 4),
                      "device_busy_ms": device_busy_ms(lambda: picker.pick(drafter.decode_one_token(root, cache)[0]),
                                                       device, reps, after=trim)}

    # The draft's context over the prompt (what generate does after prefill): one CTC proposer, shared.
    state = DecodeState(prompt[0].tolist(), root, hidden)
    ctc = CTCProposer(draft, "beam")
    ctc.start(state)
    dcache = ctc.cache
    saved = (dcache.length, ctc.s_last)

    def restore():
        """Back to the prompt: the draft cache's rows past `length` are simply overwritten later."""
        trim()
        dcache.length, ctc.s_last = saved

    def spec_full(d: CTCDrafter):
        """One speculative step as generate runs it: the step, then the draft's catch-up on what it accepted."""
        new, path_hidden, nodes = d.speculative_step(state, cache, picker, max_depth=64)
        if d.proposer is ctc:
            ctc.s_last = draft.extend(path_hidden, torch.tensor([new], device=device), dcache)
        sizes.append(nodes)

    res["spec"] = {}
    for budget in a.budgets:
        for kind in ("beam", "fixed"):
            d = CTCDrafter(base, draft, budget=budget, adaptive=False,
                           proposer=ctc if kind == "beam" else FixedTreeProposer(budget, c.vocab_size))
            sizes: list[int] = []
            full = clock.times_ms(lambda: spec_full(d), warm, reps, after=restore)
            step = clock.times_ms(
                lambda: d.speculative_step(state, cache, picker, max_depth=64), warm, reps, after=restore)
            entry = {"step_with_extend_ms": med(full), "step_ms": med(step), "nodes_mean": round(sum(sizes) / len(sizes), 2),
                     "nodes_min": min(sizes), "nodes_max": max(sizes),
                     "over_hf": round(med(full) / hf_ms, 4), "over_vanilla": round(med(full) / med(van), 4)}
            if kind == "fixed":
                tree = d.proposer.propose(state, 64, budget)
                ids, pos, mask = tree.verify_inputs(past, device, dtype)
                entry["verify_only_ms"] = med(clock.times_ms(
                    lambda: base.forward(ids, cache, position_ids=pos, attention_mask=mask), warm, reps, after=trim))
                entry["tree_inputs_ms"] = med(clock.times_ms(lambda: tree.verify_inputs(past, device, dtype), warm, reps))
                entry["verify_device_busy_ms"] = device_busy_ms(
                    lambda: base.forward(ids, cache, position_ids=pos, attention_mask=mask), device, reps, after=trim)
            res["spec"][f"{kind}{budget}"] = entry

    # The draft's own overhead: frames + candidate tree (beam, budget 64) + context update of 1 token.
    frames_ms = clock.times_ms(lambda: draft.frames(ctc.s_last, dcache), warm, reps)
    fr = draft.frames(ctc.s_last, dcache)[0]
    syms = draft.symbol_tokens()
    build_ms = clock.times_ms(lambda: ctc.policy.build(root, fr, 64, 64, symbols=syms), warm, reps)
    medusa = make_policy("medusa")  # the default policy on CUDA: a static tree, one small transfer
    medusa_ms = clock.times_ms(lambda: medusa.build(root, fr, 64, 64, symbols=syms), warm, reps)
    one = torch.tensor([[root]], device=device)
    extend_ms = clock.times_ms(lambda: draft.extend(hidden[:, -1:], one, dcache), warm, reps, after=restore)
    total = med(frames_ms) + med(build_ms) + med(extend_ms)
    res["draft_overhead"] = {"frames_ms": med(frames_ms), "beam64_build_ms": med(build_ms),
                             "medusa64_build_ms": med(medusa_ms), "extend1_ms": med(extend_ms),
                             "total_ms": round(total, 4), "fraction_of_hf_step": round(total / hf_ms, 4),
                             "fraction_of_vanilla_step": round(total / med(van), 4)}
    # KV compaction when the accepted path is not a prefix of the node order (index_select + cat).
    res["compact_kv_noncontiguous_ms"] = med(clock.times_ms(lambda: _grow_and_compact(cache, past), warm, reps,
                                                            after=trim))

    # Syncs per step: a count growing with the node budget would mean a per-node host sync.
    res["syncs_per_step"] = {}
    for b in (16, 128):
        d = CTCDrafter(base, draft, budget=b, proposer=ctc, adaptive=False)
        res["syncs_per_step"][f"beam{b}"] = count_syncs(
            lambda: d.speculative_step(state, cache, picker, max_depth=64), device)
        restore()
    res["syncs_per_step"]["vanilla"] = count_syncs(lambda: picker.pick(drafter.decode_one_token(root, cache)[0]), device)
    trim()

    # Throughput and bandwidth.
    res["tokens_per_s"] = {"hf": round(1e3 / hf_ms, 2), "vanilla": round(1e3 / med(van), 2)}
    bw = {"hf": wbytes / (hf_ms / 1e3) / 1e9, "vanilla": wbytes / (med(van) / 1e3) / 1e9}
    res["weight_gbps"] = {k: round(v, 1) for k, v in bw.items()}
    if peak_gbps:
        res["fraction_of_peak"] = {k: round(v / peak_gbps, 4) for k, v in bw.items()}
    spec64 = res["spec"].get("beam64", {}).get("step_with_extend_ms")
    if spec64:
        # Tokens per step a draft must average for speculation to beat HF's vanilla decoding.
        res["break_even_accept_length_beam64"] = round(spec64 / hf_ms, 3)
    del drafter, d, ctc, draft, cache, dcache, saved, base, model, hidden, logits
    release_memory()
    return res


def _grow_and_compact(cache, past):
    """Append 8 fake tree positions to every layer, then keep nodes [0, 2, 5] as an accepted path would."""
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layer.keys = torch.cat([k, k[:, :, -8:]], 2)
        layer.values = torch.cat([v, v[:, :, -8:]], 2)
    compact_kv(cache, past, [0, 2, 5])


def targets(timing: dict) -> dict:
    out = {}
    for name, r in timing.items():
        if not isinstance(r, dict) or "hf" not in r:
            continue
        hf = r["hf"]["step_ms"]
        spec = r["spec"].get("beam64", {})
        s_ratio = spec.get("step_with_extend_ms", float("nan")) / hf
        v_ratio = r["vanilla"]["step_ms"] / hf
        o = r["draft_overhead"]["fraction_of_hf_step"]
        out[name] = {
            "spec64_over_hf": {"value": round(s_ratio, 4), "max": TARGETS["spec64_over_hf_max"],
                               "pass": bool(s_ratio <= TARGETS["spec64_over_hf_max"]),
                               "nodes_mean": spec.get("nodes_mean")},
            "vanilla_over_hf": {"value": round(v_ratio, 4), "max": TARGETS["vanilla_over_hf_max"],
                                "pass": bool(v_ratio <= TARGETS["vanilla_over_hf_max"])},
            "draft_overhead": {"value": o, "max": TARGETS["draft_overhead_max"],
                               "pass": bool(o <= TARGETS["draft_overhead_max"])},
        }
    return out


# ---- report ------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def summary_lines(r: dict) -> list[str]:
    env = r["env"]
    L = [f"== ctc-drafter gpu_check on {env['device_name']} | torch {env['torch']} | transformers {env['transformers']}"
         f" | dry_run={env['dry_run']} | {r.get('elapsed_s', 0):.0f}s"]
    imp = r.get("imports", {})
    if not imp:
        L.append("imports without gguf: not selected")
    else:
        L.append(f"imports without gguf: {'OK' if imp.get('ok') else 'FAIL ' + str(imp.get('failed') or imp.get('error'))}"
                 + (f" (not installed here, skipped: {sorted(imp['dependency_not_installed'])})"
                    if imp.get("dependency_not_installed") else ""))
    pb = r.get("peak_bandwidth", {})
    L.append(f"peak copy bandwidth: {pb.get('gbps', '-')} GB/s")
    ex = r.get("exactness_fp32", {})
    if "all_equal" in ex:
        L.append(f"exactness fp32 spec==vanilla==HF: {'PASS' if ex['all_equal'] else 'FAIL'} "
                 f"{ex['equal_runs']}/{ex['runs']} runs (longest accepted step {ex['max_accept']} tokens)")
    else:
        L.append(f"exactness fp32: {ex.get('error', ex.get('skipped', 'not run'))}")
    ag = r.get("agreement", {})
    for dn in ("fp16", "bf16"):
        x = ag.get(dn)
        if x:
            L.append(f"{dn} spec vs vanilla: {x['identical_runs']}/{x['runs']} runs identical, "
                     f"{x['token_agreement']:.1%} tokens; max margin at divergence {x['max_margin_at_divergence']}")
    if "error" in ag or "skipped" in ag:
        L.append(f"agreement: {ag.get('error', ag.get('skipped'))}")
    budgets = r["config"]["budgets"]
    L.append("shape | HF ms | ours ms | " + " ".join(f"beam{b}" for b in budgets) + " | "
             + " ".join(f"fix{b}" for b in budgets) + " | draft ms (%HF) | GB/s HF (%peak)")
    for name, t in r.get("timing", {}).items():
        if "hf" not in t:
            L.append(f"{name}: {t.get('error', t.get('skipped', 'not run'))[:300]}")
            continue
        sp = t["spec"]
        beams = " ".join(f"{sp[f'beam{b}']['step_with_extend_ms']:.2f}/{sp[f'beam{b}']['nodes_mean']:.0f}n" for b in budgets)
        fixed = " ".join(f"{sp[f'fixed{b}']['step_with_extend_ms']:.2f}" for b in budgets)
        do = t["draft_overhead"]
        frac = t.get("fraction_of_peak", {}).get("hf")
        bw = f"{t['weight_gbps']['hf']:.0f}" + (f" ({frac:.0%})" if frac is not None else "")
        L.append(f"{name} | {t['hf']['step_ms']:.2f} | {t['vanilla']['step_ms']:.2f} | {beams} | {fixed} | "
                 f"{do['total_ms']:.2f} ({do['fraction_of_hf_step']:.0%}) | {bw}")
        L.append(f"   syncs/step {t['syncs_per_step']}; draft: frames {do['frames_ms']:.2f} beam-build "
                 f"{do['beam64_build_ms']:.2f} medusa-build {do.get('medusa64_build_ms', float('nan')):.2f} extend "
                 f"{do['extend1_ms']:.2f} ms; spec64 / HF step {t.get('break_even_accept_length_beam64')}")
        L.append(f"   GPU busy per step (kernels only): vanilla {t['vanilla'].get('device_busy_ms')} ms, "
                 f"64-node verify {sp.get('fixed64', {}).get('verify_device_busy_ms')} ms")
    for name, tg in r.get("targets", {}).items():
        L.append(f"targets {name}: " + "; ".join(
            f"{k} {v['value']:.3f} <= {v['max']} {'PASS' if v['pass'] else 'FAIL'}" for k, v in tg.items()))
    errs = [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
    errs += [f"timing.{k}" for k, v in r.get("timing", {}).items() if "error" in v]
    L.append(f"sections with errors: {errs or 'none'} | JSON: {r['config']['out']}/gpu_check.json")
    return L


# ---- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, not the GPU")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--past", type=int, default=None, help="KV length for timing (default 512; 32 with --dry-run)")
    ap.add_argument("--budgets", default="16,32,64,128")
    ap.add_argument("--reps", type=int, default=20, help="timed reps per measurement after warm-up")
    ap.add_argument("--hf-steps", type=int, default=None, help="tokens per timed HF generate (default 40; 8 dry)")
    ap.add_argument("--shapes", default="7b,13b")
    ap.add_argument("--sections", default="imports,peak,exactness,agreement,timing")
    ap.add_argument("--time-budget-s", type=float, default=420.0,
                    help="start no new section/shape after this many seconds (the JSON so far is kept)")
    a = ap.parse_args(argv)
    a.budgets = [int(x) for x in a.budgets.split(",")]
    a.past = a.past or (32 if a.dry_run else 512)
    a.hf_steps = a.hf_steps or (8 if a.dry_run else 40)
    device = torch.device(a.device or ("cpu" if a.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; use --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import transformers

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    start = time.perf_counter()
    sections = set(a.sections.split(","))
    r: dict = {
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
                "device": str(device), "dry_run": a.dry_run,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
        "config": {"past": a.past, "budgets": a.budgets, "reps": a.reps, "hf_steps": a.hf_steps,
                   "shapes": {k: (DRY_SHAPES if a.dry_run else REAL_SHAPES)[k] for k in a.shapes.split(",")},
                   "targets": TARGETS, "out": str(out_dir)},
        "timing": {}, "targets": {}, "section_s": {},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        r["env"].update(total_memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")

    def run(name, fn, *args):
        if name.split(".")[0] not in sections:
            return {"skipped": "not selected"}
        if time.perf_counter() - start > a.time_budget_s:
            return {"skipped": "time budget spent"}
        t = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            res = fn(*args)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            release_memory()
        r["section_s"][name] = round(time.perf_counter() - t, 2)
        r["elapsed_s"] = round(time.perf_counter() - start, 2)
        write_json(path, r)
        return res

    r["imports"] = run("imports", check_imports, a)
    r["peak_bandwidth"] = run("peak", peak_bandwidth, a, device)
    r["exactness_fp32"] = run("exactness", exactness_fp32, a, device)
    r["agreement"] = run("agreement", agreement, a, device)
    peak = r["peak_bandwidth"].get("gbps")
    for name, shape in r["config"]["shapes"].items():
        r["timing"][name] = run(f"timing.{name}", time_shape, a, name, shape, device, peak)
    r["targets"] = targets(r["timing"])
    r["elapsed_s"] = round(time.perf_counter() - start, 2)
    lines = summary_lines(r)
    r["summary"] = lines
    write_json(path, r)
    print("\n".join(lines), flush=True)
    failed = any(isinstance(v, dict) and "error" in v for v in [*r.values(), *r["timing"].values()])
    return 1 if failed or not r["exactness_fp32"].get("all_equal", True) else 0


if __name__ == "__main__":
    sys.exit(main())
