"""Choose the base's CPU linear kernels by timing whole base passes on this machine, once, and cache it.

Which kernel is fastest depends on the CPU, the dtype and the rows per call (models/cpu_kernels.py):
on an AMD EPYC oneDNN packed weights win for 1 and for 4 rows in fp32; on an Intel Xeon with AMX
PyTorch's stock kernel wins for 1 row in fp32 and packed wins for trees. So at first load we time one
base pass over n new tokens on top of a PAST-token KV cache (what scripts/tree_cost.py prints) for
each candidate kernel and each n in SIZES, interleaved so that noise from other processes spreads
over all of them, keep each one's fastest repetition (other processes only ever add time, so the
minimum is the steadiest estimate on a shared machine), and give each size class the kernel that was
fastest. The result, with the timings, is cached as JSON under cache_dir()/kernels, keyed by a
fingerprint of the CPU (model name, flags, torch threads), the library versions, the model's shape
and dtype and this procedure; a later load with the same fingerprint reads the decision at once.
Timings cut short by BUDGET_S or too noisy (a busy machine) choose for this load only.

The thread count is chosen the same way: unless it was fixed (an int, OMP_NUM_THREADS), the passes
are timed with 1 thread and with all of torch's threads, and the count whose best kernels make the
cheaper vanilla step plus CHOICE_TREE-node pass wins (fewer threads on a tie). On the 2-core Xeon two
threads help an idle machine but collapse when another process holds a core (BENCHMARKS.md), so
a measurement taken under load is not cached.

The same timings of the chosen plan make the pass cost model (models/pass_cost.py) that proposers
use to size trees.

    report = apply_cpu_kernels(base, "auto")   # or "stock" / "packed" to force one
    report.label            # 'stock<=1,packed': stock for 1 row, packed above
    report.cost.pass_ms(8)  # ms of an 8-node verification pass on this machine
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CTCDrafterError
from .base import BaseModel, cache_dir
from .cpu_kernels import (PACKED, STOCK, DispatchLinear, KernelPlan, PackedLinear, dispatch_linears, pack_linears,
                          packable, plan_label, settle_linears)
from .kv_cache import compact_kv, new_kv_cache
from .pass_cost import PassCostModel

log = logging.getLogger(__name__)

MODES = ("auto", STOCK, PACKED)
KERNELS = (STOCK, PACKED)
SIZES = (1, 4, 8, 16, 32, 64)  # rows per pass: 1 = a vanilla step, the rest tree sizes
PAST = 256  # KV length the passes are timed on (the middle of a typical chat answer)
REPS = 3  # timed passes per (kernel, size), after one warm-up
BUDGET_S = 15.0  # stop timing after the repetition that passes this (a busy machine), and do not cache
NOISE_LIMIT = 1.25  # median over cells of slowest/fastest rep above this: too noisy to cache
TIE = 0.03  # a kernel within 3% of the fastest keeps the previous size class's kernel (no flapping on noise)
CHOICE_TREE = 16  # the tree size the thread count is judged on, with the 1-row pass (CPU hybrid's cap)
SCHEMA = 4  # bump when the procedure changes: old cache entries then no longer match

Timings = dict[str, dict[int, float]]  # kernel -> rows -> ms of one whole base pass (fastest repetition)
Samples = dict[str, dict[int, list[float]]]  # kernel -> rows -> ms of each timed pass
Measure = Callable[[BaseModel, KernelPlan, tuple[int, ...]], Samples]


@dataclass
class KernelReport:
    """What apply_cpu_kernels chose and why."""

    mode: str  # what was asked: auto | stock | packed
    table: list[tuple[int, str]]  # ascending (max rows, kernel); the last class also takes larger passes
    timings_ms: Timings = field(default_factory=dict)  # empty when nothing was measured
    cache_hit: bool = False
    cache_file: str | None = None
    measure_s: float = 0.0  # seconds spent timing at this load (0 on a cache hit)
    cost: PassCostModel | None = None  # pass cost of the chosen plan; None off CPU
    note: str = ""  # why nothing was chosen, when so
    threads: int | None = None  # torch threads set for this process (None: left alone)
    threads_ms: dict[int, float] = field(default_factory=dict)  # candidate -> 1-row + CHOICE_TREE-row ms

    @property
    def label(self) -> str:
        """'stock', 'packed', or a mixed plan such as 'stock<=1,packed'."""
        return plan_label(self.table)

    def kernel_for(self, rows: int) -> str:
        return KernelPlan(self.table).kernel_for(rows) if self.table else STOCK

    def to_dict(self) -> dict:
        return {
            "label": self.label, "mode": self.mode, "table": [[n, k] for n, k in self.table],
            "timings_ms": {k: {str(n): round(ms, 2) for n, ms in t.items()} for k, t in self.timings_ms.items()},
            "cache_hit": self.cache_hit, "cache_file": self.cache_file, "measure_s": round(self.measure_s, 2),
            "pass_cost": self.cost.to_dict() if self.cost else None, "note": self.note,
            "threads": self.threads, "threads_ms": {str(t): round(ms, 2) for t, ms in self.threads_ms.items()},
        }

    def describe(self) -> str:
        """A few lines for people: the plan, where it came from, and the timings it rests on."""
        if not self.timings_ms:
            return f"CPU kernels: {self.label} ({self.note or self.mode})"
        src = (f"cached decision, {self.cache_file}" if self.cache_hit
               else f"measured now in {self.measure_s:.1f} s, "
               + (f"NOT cached: {self.note}" if self.note else f"cached in {self.cache_file}"))
        classes, lo = [], 1
        for n, k in self.table:
            classes.append(f"{k} for {lo}-{n} rows" if n > lo else f"{k} for {n} row{'s' if n > 1 else ''}")
            lo = n + 1
        lines = [f"CPU kernels: {', '.join(classes)} (and larger) [{self.mode}; {src}]"]
        if self.threads_ms:
            lines.append(f"  threads {self.threads} (1-row + {CHOICE_TREE}-row pass: "
                         + ", ".join(f"{t} thread{'s' if t > 1 else ''} {ms:.1f} ms" for t, ms in self.threads_ms.items())
                         + ")")
        sizes = sorted({n for t in self.timings_ms.values() for n in t})
        lines.append("  base pass ms, rows " + " ".join(f"{n:>6}" for n in sizes))
        for k, t in self.timings_ms.items():
            lines.append(f"  {k:<19}" + " ".join(f"{t.get(n, float('nan')):6.1f}" for n in sizes))
        return "\n".join(lines)


# ---- fingerprint and cache ---------------------------------------------------------------------

def fingerprint(base: BaseModel, sizes: tuple[int, ...] = SIZES, threads: tuple[int, ...] | None = None) -> dict:
    """Everything a measured decision depends on: change any of it and the kernels are timed again.
    threads: the candidate thread counts (default: torch's current count alone)."""
    import transformers

    c = base.config
    shape = {k: int(getattr(c, k, 0) or 0)
             for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size")}
    return {"schema": SCHEMA, **base.cpu.identity(), "threads": list(threads or (torch.get_num_threads(),)),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "model": base.name, "dtype": str(base.dtype).replace("torch.", ""), "shape": shape,
            "sizes": list(sizes), "past": PAST, "kernels": list(KERNELS)}


def cache_file_for(fp: dict) -> Path:
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{fp['model']}-{fp['dtype']}")
    return cache_dir() / "kernels" / f"{safe}-{key}.json"


def read_cached(path: Path, fp: dict) -> dict | None:
    """The cached record at path if it was made under exactly this fingerprint, else None."""
    try:
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fp:
            return None
        record["timings_by_threads"] = {
            int(th): {k: {int(n): float(ms) for n, ms in t.items()} for k, t in timings.items()}
            for th, timings in record["timings_by_threads"].items()}
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing or unreadable: measure again


def write_cached(path: Path, record: dict) -> bool:
    """Write atomically; a read-only cache only costs a re-measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot cache the CPU kernel choice in %s: %s", path, e)
        return False


# ---- measuring and choosing ----------------------------------------------------------------------

def _random_ids(n: int, vocab: int, device, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _chain_inputs(n: int, past: int, vocab: int, device, dtype):
    """input_ids, position_ids, additive 4D mask [1,1,n,past+n] of an n-node chain (a tree's cost is
    set by its node count, not its shape; the mask has the same form as a tree's)."""
    ids = _random_ids(n, vocab, device, seed=n)
    pos = torch.arange(past, past + n, device=device)[None]
    allowed = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
    mask = torch.zeros(n, past + n, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask[None, None]


def measure_passes(base: BaseModel, plan: KernelPlan, sizes: tuple[int, ...] = SIZES,
                   kernels: tuple[str, ...] = KERNELS, reps: int = REPS, past: int = PAST,
                   budget_s: float | None = BUDGET_S) -> Samples:
    """ms of each timed base pass over n new tokens (logits for all of them, as in verification) on a
    `past`-token cache, per kernel (forced through `plan`) and n. Kernels and sizes are interleaved
    within each repetition so that a burst of load from other processes hits all of them alike; after
    `budget_s` no further repetition starts (at least one is timed)."""
    past = max(1, min(past, base.max_length - max(sizes) - 1))
    cache = new_kv_cache(base)
    vocab = int(base.config.vocab_size)
    base.forward(_random_ids(past, vocab, base.device, seed=0), cache, logits_at=slice(-1, None))
    inputs = {n: _chain_inputs(n, past, vocab, base.device, base.dtype) for n in sizes}
    times: Samples = {k: {n: [] for n in sizes} for k in kernels}
    t0 = time.perf_counter()
    try:
        for rep in range(reps + 1):  # rep 0 warms up each (kernel, size)
            if rep > 1 and budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
            for n in sizes:
                ids, pos, mask = inputs[n]
                for k in kernels:
                    plan.forced = k
                    t = time.perf_counter()
                    base.forward(ids, cache, position_ids=pos, attention_mask=mask)
                    if rep:
                        times[k][n].append((time.perf_counter() - t) * 1e3)
                    compact_kv(cache, past, [])
    finally:
        plan.forced = None
    return times


def fastest(samples: Samples) -> Timings:
    """Each cell's fastest repetition: load from other processes only adds time."""
    return {k: {n: min(v) for n, v in t.items()} for k, t in samples.items()}


def unreliable(samples: Samples, reps: int = REPS) -> str:
    """Why these samples should not be cached ('' when they may): cut short, or too noisy."""
    cells = [v for t in samples.values() for v in t.values()]
    if min(len(v) for v in cells) < reps:
        return f"timing stopped after {min(len(v) for v in cells)} of {reps} repetitions (busy machine?)"
    spread = statistics.median(max(v) / min(v) for v in cells)
    if spread > NOISE_LIMIT:
        return f"timings too noisy to keep (median slowest/fastest {spread:.2f} > {NOISE_LIMIT}; busy machine?)"
    return ""


def choose_table(timings: Timings) -> list[tuple[int, str]]:
    """Per measured size the fastest kernel; size n's class covers rows in (previous size, n].
    Within TIE of the fastest, the previous class's kernel stays (for the first size: the kernel
    listed first), so noise does not split the table. Neighbouring classes with the same kernel merge."""
    sizes = sorted({n for t in timings.values() for n in t})
    table: list[tuple[int, str]] = []
    for n in sizes:
        here = [k for k in timings if n in timings[k]]
        fastest = min(timings[k][n] for k in here)
        incumbent = table[-1][1] if table else here[0]
        near = incumbent in here and timings[incumbent][n] <= fastest * (1 + TIE)
        best = incumbent if near else min(here, key=lambda k: timings[k][n])
        if table and table[-1][1] == best:
            table[-1] = (n, best)
        else:
            table.append((n, best))
    return table


def _cost_of(table: list[tuple[int, str]], timings: Timings) -> PassCostModel:
    plan = KernelPlan(table)
    sizes = sorted({n for t in timings.values() for n in t})
    return PassCostModel({n: timings[plan.kernel_for(n)][n] for n in sizes}, past=PAST)


def _install(model, table: list[tuple[int, str]], plan: KernelPlan | None) -> None:
    """Put the plan into the model's linear layers. `plan` is the DispatchLinears' plan when the layers
    were already swapped for timing, else None (plain nn.Linear layers)."""
    if plan is not None:
        plan.table = list(table)
        settle_linears(model, plan)
        return
    kernels = {k for _, k in table}
    if kernels == {PACKED}:
        pack_linears(model)
    elif kernels != {STOCK}:
        dispatch_linears(model, KernelPlan(table))


_initial_threads: list[int] = []  # torch's count before this module first changed it


def thread_candidates(threads: int | str = "auto") -> tuple[int, ...]:
    """Thread counts to time: the one asked for, the one OMP_NUM_THREADS fixed, or 1 and torch's count
    (as it was before an earlier choice in this process changed it, so a second load finds the cache)."""
    if not _initial_threads:
        _initial_threads.append(torch.get_num_threads())
    if threads != "auto":
        if not isinstance(threads, int) or threads < 1:
            raise CTCDrafterError(f"threads must be 'auto' or a positive integer, got {threads!r}")
        return (threads,)
    if os.environ.get("OMP_NUM_THREADS"):
        return (_initial_threads[0],)
    return tuple(sorted({1, _initial_threads[0]}))


def choose_threads(by_threads: dict[int, Timings]) -> tuple[int, dict[int, float]]:
    """(thread count, its score per candidate): the cheaper vanilla step plus CHOICE_TREE-node pass,
    each with its fastest kernel; within TIE the fewer threads (they leave cores to other work)."""
    def best(t: Timings, n: int) -> float:
        sizes = sorted({m for k in t.values() for m in k})
        m = min(sizes, key=lambda s: abs(s - n))
        return min(k[m] for k in t.values() if m in k)

    score = {th: best(t, 1) + best(t, CHOICE_TREE) for th, t in sorted(by_threads.items())}
    low = min(score.values())
    return next(th for th, ms in score.items() if ms <= low * (1 + TIE)), score


def apply_cpu_kernels(base: BaseModel, mode: str = "auto", *, threads: int | str = "auto",
                      measure: Measure | None = None, cache_file: str | Path | None = None) -> KernelReport:
    """Give a CPU fp32/bf16 base the linear kernels `mode` asks for, set torch's thread count, and return
    what was chosen.

    auto: the fastest kernel per pass size, measured on this machine at first load (a few seconds
    for SmolLM2-135M per thread count; BENCHMARKS.md) and cached; stock / packed: force one (the
    timings, measured or cached alike, still give the cost model). threads: "auto" (timed, see the
    module's docstring) or a fixed count. Other devices and dtypes are left as they are.
    measure / cache_file replace the timing procedure and the cache location (tests).
    """
    if mode not in MODES:
        raise CTCDrafterError(f"cpu kernels must be one of {', '.join(MODES)}, got {mode!r}")
    candidates = thread_candidates(threads)
    model = base.model
    if any(isinstance(m, (PackedLinear, DispatchLinear)) for m in model.modules()):
        raise CTCDrafterError("this base's linear layers were already swapped; apply CPU kernels once per load")
    if not packable(model):
        return KernelReport(mode, [(1, STOCK)], note="not a CPU float32/bfloat16 model with oneDNN: stock layers")
    fp = fingerprint(base, threads=candidates)
    path = Path(cache_file) if cache_file is not None else cache_file_for(fp)
    record = read_cached(path, fp)
    plan, measure_s, note = None, 0.0, ""
    if record is None:
        plan = KernelPlan()
        dispatch_linears(model, plan)
        t0 = time.perf_counter()
        by_threads, notes = {}, []
        for th in candidates:
            torch.set_num_threads(th)
            samples = (measure or measure_passes)(base, plan, SIZES)
            by_threads[th] = fastest(samples)
            notes.append(unreliable(samples))
        measure_s = time.perf_counter() - t0
        record = {"fingerprint": fp, "timings_by_threads": by_threads, "measure_s": round(measure_s, 3),
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        note = next((n for n in notes if n), "")
        log.debug("timed the CPU kernels in %.1f s: %s %s", measure_s, by_threads, note)
        if not note and not write_cached(path, record):
            note = "could not write the cache"
    chosen, scores = choose_threads(record["timings_by_threads"])
    torch.set_num_threads(chosen)
    timings = record["timings_by_threads"][chosen]
    table = choose_table(timings) if mode == "auto" else [(max(SIZES), mode)]
    _install(model, table, plan)
    base.kernels_changed()
    return KernelReport(mode, table, timings, cache_hit=plan is None, cache_file=None if note else str(path),
                        measure_s=measure_s, cost=_cost_of(table, timings), note=note, threads=chosen,
                        threads_ms=scores if len(scores) > 1 else {})
