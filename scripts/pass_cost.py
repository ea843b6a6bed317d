"""Per-pass cost of each engine (issue 33): ms of ONE forward pass of N new tokens after a P-token past.

    python scripts/pass_cost.py [--base-model default] [--threads 1,2] [--past 256,1024] [--sizes 1,2,4,8,16]
        [--engines eager-fp32,eager-bf16,compiled-fp32,compiled-bf16,compiled-int8,compiled-int4,llama-q4_1,llama-bf16]
        [--reps 7] [--gguf-bf16 PATH] [--label "busy machine"] [--out docs/benchmarks/pass_cost_<date>]
        [--beta 2.5 --nodes 4 --overhead-ms 8] [--from-cells OUT/cells.json]

Engines (logits for all N tokens, as a verification pass needs):
  eager-fp32, eager-bf16   our PyTorch path as the decode loop runs it: the base loaded by `load_base_model`,
                           the CPU kernels `--cpu-kernels auto` picks, our in-place KV cache; N = 1 is the
                           plain step, N > 1 the tree pass (chain mask; on a CPU a bf16 tree attends node by node)
  compiled-*               the same weights in gpt-fast's form (models/static_llama.py): a static KV cache,
                           `torch.compile` per pass size (bucket), fp32, bf16, weight-only int8 or int4 (bf16
                           activations); the first call of each bucket is the compile, reported apart
  backend-int4, -int8      the compiled backend our loop runs (`--backend compiled-int4|int8`,
                           models/compiled_base.py): the same static engine with its 2048-row cache, each
                           row's attention in position order (row_attention: exact against the 1-token step)
                           over the rows in use; N > 1 a chain tree
  llama-q4_1, llama-bf16   llama.cpp through llama_cpp's low-level API: one `llama_decode` of an N-token batch
                           after a P-token past, the N cells removed again (`llama_memory_seq_rm`) so P stays
                           fixed; the Q4_1 GGUF the embedded default comes from, and a bf16 GGUF (--gguf-bf16)
An engine whose package or file is missing is skipped with a line saying so.

Each cell: the median of --reps timed passes after one warm-up, the sizes interleaved within a repetition
(so a burst of load from other processes hits all of them alike). Each thread count runs in its own
process (inductor bakes the thread count into the kernels it generates). Writes cells.json, cells.csv and
pass_cost.png (ms per pass against N, one line per engine, a panel per threads x past) into --out, and
prints the table and what it means for issue 33's target (our loop >= 1.5x llama.cpp's greedy): a loop
emitting --beta tokens per step with --nodes-node trees and --overhead-ms of draft work per step would
run at beta * llama(1) / (engine(nodes) + overhead) times llama.cpp's greedy, llama(1) being the Q4_1
1-token pass. --from-cells redoes the table, the outlook and the plot from an earlier cells.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TORCH_ENGINES = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "compiled-int8", "compiled-int4",
                 "backend-int4", "backend-int8")
LLAMA_ENGINES = ("llama-q4_1", "llama-bf16")
ENGINES = TORCH_ENGINES + LLAMA_ENGINES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
DEFAULT_BF16_GGUF = "/work/runs/llama/SmolLM2-135M-Instruct.bf16.gguf"  # convert_hf_to_gguf.py --outtype bf16

Samples = dict[int, list[float]]  # N -> ms of each timed pass


def time_passes(run, sizes: list[int], reps: int) -> tuple[Samples, dict[int, float]]:
    """run(n) does one pass of n tokens. -> (ms per timed pass, ms of each size's first call: warm-up or compile)."""
    samples: Samples = {n: [] for n in sizes}
    first: dict[int, float] = {}
    for rep in range(reps + 1):
        for n in sizes:
            t = time.perf_counter()
            run(n)
            ms = (time.perf_counter() - t) * 1e3
            if rep:
                samples[n].append(ms)
            else:
                first[n] = ms
    return samples, first


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))  # [1,n]


# ---- our PyTorch path, eager ---------------------------------------------------------------------------

def eager_engine(base_model: str, dtype: str, threads: int, pasts, sizes, reps) -> dict:
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.kernel_choice import _chain_inputs, apply_cpu_kernels
    from ctc_drafter.models.kv_cache import compact_kv, new_kv_cache

    base = load_base_model(base_model, device="cpu", dtype=DTYPES[dtype])
    kernels = apply_cpu_kernels(base, "auto", threads=threads)
    vocab, out = int(base.config.vocab_size), {}
    for past in pasts:
        cache = new_kv_cache(base)
        base.forward(random_ids(past, vocab, 0), cache, logits_at=slice(-1, None))
        inputs = {n: _chain_inputs(n, past, vocab, base.device, base.dtype) for n in sizes}

        def run(n):
            ids, pos, mask = inputs[n]
            if n == 1:  # the plain step: no tree mask (decoding/generate.py)
                base.forward(ids, cache)
            else:
                base.forward(ids, cache, position_ids=pos, attention_mask=mask)
            compact_kv(cache, past, [])

        out[past] = time_passes(run, sizes, reps)[0]
    return {"cells": out, "note": f"kernels {kernels.label}"}


# ---- the same weights compiled, gpt-fast style ----------------------------------------------------------

def compiled_engine(base_model: str, dtype: str, threads: int, pasts, sizes, reps) -> dict:
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.static_llama import StaticLlama

    torch.set_num_threads(threads)
    hf = load_base_model(base_model, device="cpu", dtype=torch.float32).model
    quant = dtype if dtype in ("int8", "int4") else None
    vocab, out, compile_s = int(hf.config.vocab_size), {}, 0.0
    for past in pasts:
        # the cache holds the past and the largest bucket: attention runs over all of its rows, masked
        m = StaticLlama(hf, max_len=past + max(sizes), dtype=DTYPES[dtype], quant=quant).compile()
        m.prefill(random_ids(past, vocab, 0))
        inputs = {n: (random_ids(n, vocab, n), torch.arange(past, past + n)) for n in sizes}
        samples, first = time_passes(lambda n: m(*inputs[n]), sizes, reps)
        compile_s += sum(first[n] - statistics.median(samples[n]) for n in sizes) / 1e3
        out[past] = samples
    return {"cells": out, "compile_s": round(compile_s, 1),
            "note": "static cache of past + max N rows, one compiled graph per N shared by the layers"}


def backend_engine(base_model: str, quant: str, threads: int, pasts, sizes, reps) -> dict:
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.compiled_base import compile_base
    from ctc_drafter.models.kv_cache import new_kv_cache

    torch.set_num_threads(threads)
    base = compile_base(load_base_model(base_model, device="cpu", dtype=torch.float32), f"compiled-{quant}")
    vocab, out, compile_s = int(base.config.vocab_size), {}, 0.0
    for past in pasts:
        cache = new_kv_cache(base)
        base.forward(random_ids(past, vocab, 0), cache, logits_at=slice(-1, None))
        inputs = {n: random_ids(n, vocab, n) for n in sizes}

        def run(n):
            cache.length = past  # drop the last pass's rows, as a rejected tree is dropped
            base.forward(inputs[n], cache)

        samples, first = time_passes(run, sizes, reps)
        compile_s += sum(first[n] - statistics.median(samples[n]) for n in sizes) / 1e3
        out[past] = samples
    return {"cells": out, "compile_s": round(compile_s, 1),
            "note": f"our loop's backend: {base.engine.max_len}-row static cache, row attention over the rows in use"}


# ---- llama.cpp --------------------------------------------------------------------------------------------

def llama_engine(gguf: Path, threads: int, pasts, sizes, reps) -> dict:
    import llama_cpp as L

    from ctc_drafter.models.cpu_info import host_cpu

    quiet_llama_cpp(L)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    amx = host_cpu().has_amx
    if amx and hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False  # the AMX repacked-weight kernel segfaults on these CPUs (issue 33)
    model = L.llama_model_load_from_file(str(gguf).encode(), mp)
    if not model:
        raise SystemExit(f"pass_cost.py: llama.cpp cannot load {gguf}")
    chunk = 512
    cp = L.llama_context_default_params()
    cp.n_ctx = max(pasts) + max(sizes) + 16
    cp.n_batch = cp.n_ubatch = chunk
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(chunk, 0, 1)
    out = {}

    def decode(tokens: list[int], start: int, all_logits: bool) -> None:
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("pass_cost.py: llama_decode failed")
        L.llama_synchronize(ctx)

    try:
        for past in pasts:
            L.llama_memory_clear(mem, True)
            prefix = random_ids(past, vocab, 0)[0].tolist()
            for s in range(0, past, chunk):
                decode(prefix[s:s + chunk], s, False)
            inputs = {n: random_ids(n, vocab, n)[0].tolist() for n in sizes}

            def run(n):
                decode(inputs[n], past, True)
                L.llama_memory_seq_rm(mem, 0, past, -1)  # back to the P-token past

            out[past] = time_passes(run, sizes, reps)[0]
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    note = "flash attention " + ("auto" if cp.flash_attn_type == -1 else str(cp.flash_attn_type))
    return {"cells": out, "note": note + (", use_extra_bufts off (AMX)" if amx else "")}


def quiet_llama_cpp(L) -> None:
    """llama.cpp logs every load to stderr; llama_cpp forwards it to this logger: errors only."""
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def missing(engine: str, a) -> str:
    """Why `engine` cannot run here ('' when it can)."""
    if engine.startswith("llama-"):
        from ctc_drafter.evaluation.llamacpp_engine import llama_cpp_missing

        reason = llama_cpp_missing()
        if reason:
            return reason
        if a.base_model != "default":
            return "the GGUFs are those of the embedded default base"
        gguf = gguf_of(engine, a)
        if not gguf.is_file():
            return f"no GGUF at {gguf} (--gguf-bf16)"
    if engine.startswith(("compiled-", "backend-")) and engine.endswith("int4") and not hasattr(torch.ops.aten,
                                                                                "_weight_int4pack_mm_for_cpu"):
        return "this torch has no _weight_int4pack_mm_for_cpu"
    return ""


def gguf_of(engine: str, a) -> Path:
    from ctc_drafter.evaluation.llamacpp_engine import gguf_for

    return gguf_for("default") if engine == "llama-q4_1" else Path(a.gguf_bf16)


def measure(engine: str, a, threads: int) -> dict:
    """One engine at one thread count over the whole (past, N) grid."""
    pasts, sizes = a.past_list, a.size_list
    kind, _, dtype = engine.partition("-")
    t0 = time.perf_counter()
    if kind == "eager":
        r = eager_engine(a.base_model, dtype, threads, pasts, sizes, a.reps)
    elif kind == "compiled":
        r = compiled_engine(a.base_model, dtype, threads, pasts, sizes, a.reps)
    elif kind == "backend":
        r = backend_engine(a.base_model, dtype, threads, pasts, sizes, a.reps)
    else:
        r = llama_engine(gguf_of(engine, a), threads, pasts, sizes, a.reps)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


def cells_of(engine: str, threads: int, r: dict) -> list[dict]:
    return [{"engine": engine, "threads": threads, "past": past, "n": n, "ms": round(statistics.median(v), 3),
             "ms_min": round(min(v), 3), "reps": len(v)} for past, t in r["cells"].items() for n, v in t.items()]


def run_threads(a, threads: int) -> dict:
    """Every engine at one thread count, in this process: {"cells": [...], "engines": {engine: info}}."""
    cells, info = [], {}
    for engine in a.engine_list:
        why = missing(engine, a)
        if why:
            print(f"skipped {engine}: {why}", flush=True)
            info[engine] = {"skipped": why}
            continue
        r = measure(engine, a, threads)
        cells += cells_of(engine, threads, r)
        info[engine] = {k: v for k, v in r.items() if k != "cells"}
        print(f"{engine} at {threads} thread(s): {r['wall_s']} s"
              + (f", compile {r['compile_s']} s" if "compile_s" in r else "") + f" ({r.get('note', '')})", flush=True)
    return {"cells": cells, "engines": info}


# ---- output ----------------------------------------------------------------------------------------------

def table(cells: list[dict]) -> str:
    """Markdown: a row per (threads, past, engine), a column per N (ms per pass)."""
    sizes = sorted({c["n"] for c in cells})
    rows: dict[tuple, dict[int, float]] = {}
    for c in cells:
        rows.setdefault((c["threads"], c["past"], c["engine"]), {})[c["n"]] = c["ms"]
    lines = ["| threads | past | engine | " + " | ".join(f"N={n}" for n in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for (th, past, eng), ms in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(f"| {th} | {past} | {eng} | " + " | ".join(f"{ms[n]:.1f}" if n in ms else "-" for n in sizes)
                     + " |")
    return "\n".join(lines)


TARGET = 1.5  # issue 33: our best CPU path >= 1.5x llama.cpp's own greedy


def outlook(cells: list[dict], beta: float, nodes: int, overhead_ms: float) -> str:
    """Markdown: per (threads, past), the pass cost a loop would need for TARGET x llama.cpp greedy, and
    what each engine's `nodes`-token pass would give (x llama.cpp greedy)."""
    ms = {(c["engine"], c["threads"], c["past"], c["n"]): c["ms"] for c in cells}
    engines = list(dict.fromkeys(c["engine"] for c in cells))
    keys = sorted({(c["threads"], c["past"]) for c in cells})
    lines = [f"| threads | past | llama.cpp Q4_1, 1 token (ms) | {nodes}-node pass needed for {TARGET}x (ms) | "
             + " | ".join(engines) + " |", "|---|---|---|---|" + "---|" * len(engines)]
    for th, past in keys:
        ref = ms.get(("llama-q4_1", th, past, 1))
        if ref is None:
            continue
        need = beta * ref / TARGET - overhead_ms
        cols = [f"{beta * ref / (ms[(e, th, past, nodes)] + overhead_ms):.2f}x" if (e, th, past, nodes) in ms else "-"
                for e in engines]
        lines.append(f"| {th} | {past} | {ref:.1f} | {need:.1f} | " + " | ".join(cols) + " |")
    if len(lines) == 2:
        return ""
    return (f"A loop at beta {beta} with {nodes}-node passes and {overhead_ms:g} ms of draft work per step, "
            f"against llama.cpp's greedy (its 1-token pass):\n\n" + "\n".join(lines))


def plot(cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({c["threads"] for c in cells})
    pasts = sorted({c["past"] for c in cells})
    engines = list(dict.fromkeys(c["engine"] for c in cells))
    fig, axes = plt.subplots(len(threads), len(pasts), figsize=(5.5 * len(pasts), 4 * len(threads)),
                             squeeze=False, sharex=True)
    for i, th in enumerate(threads):
        for j, past in enumerate(pasts):
            ax = axes[i][j]
            for eng in engines:
                pts = sorted((c["n"], c["ms"]) for c in cells if (c["engine"], c["threads"], c["past"]) == (eng, th, past))
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="--" if eng.startswith("llama") else "-", label=eng)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({c["n"] for c in cells}), [str(n) for n in sorted({c["n"] for c in cells})])
            ax.set_yscale("log")
            ax.set_title(f"{th} thread{'s' if th > 1 else ''}, past {past} tokens")
            ax.set_xlabel("new tokens in the pass (N)")
            ax.set_ylabel("ms per pass")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, cells: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["engine", "threads", "past", "n", "ms", "ms_min", "reps"])
        w.writeheader()
        w.writerows(cells)
    if cells:
        plot(cells, out / "pass_cost.png", f"{meta['base_model']}, {meta['cpu']}; {meta['label']}".strip("; "))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--engines", default="all", help=f"comma-separated subset of {', '.join(ENGINES)}")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--past", default="256,1024")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gguf-bf16", default=DEFAULT_BF16_GGUF)
    ap.add_argument("--label", default="", help="what else ran on the machine, for the plot and cells.json")
    ap.add_argument("--out", default=f"docs/benchmarks/pass_cost_{datetime.date.today().isoformat()}")
    ap.add_argument("--beta", type=float, default=2.5, help="tokens per step of the loop the outlook assumes")
    ap.add_argument("--nodes", type=int, default=4, help="its tree size (a pass size of the grid)")
    ap.add_argument("--overhead-ms", type=float, default=8.0, help="its draft work per step outside the base pass")
    ap.add_argument("--from-cells", default=None, help="tabulate and plot this cells.json again; measure nothing")
    ap.add_argument("--one-thread-count", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.engine_list = list(ENGINES) if a.engines == "all" else a.engines.split(",")
    bad = [e for e in a.engine_list if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {', '.join(bad)} (known: {', '.join(ENGINES)})")
    try:
        a.thread_list = [int(x) for x in a.threads.split(",")]
        a.past_list = [int(x) for x in a.past.split(",")]
        a.size_list = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        ap.error("--threads, --past and --sizes take comma-separated integers")
    if min(a.thread_list + a.past_list + a.size_list) < 1 or a.reps < 1:
        ap.error("threads, past lengths, sizes and --reps must be >= 1")
    return a


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = parse_args(argv)
    from ctc_drafter.models.base import quiet_transformers
    from ctc_drafter.models.cpu_info import host_cpu

    quiet_transformers()
    if a.from_cells:
        data = json.loads(Path(a.from_cells).read_text())
        write_outputs(Path(a.out), data["cells"], data["meta"])
        report(data["cells"], a)
        return
    if a.one_thread_count is not None:
        Path(a.child_out).write_text(json.dumps(run_threads(a, a.one_thread_count)))
        return
    t0 = time.perf_counter()
    cells, engines = [], {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for th in a.thread_list:
        child = out / f".threads{th}.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--one-thread-count", str(th), "--child-out", str(child)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(th)})
        r = json.loads(child.read_text())
        child.unlink()
        cells += r["cells"]
        engines[str(th)] = r["engines"]
    meta = {"base_model": a.base_model, "cpu": host_cpu().name, "label": a.label, "reps": a.reps,
            "torch": torch.__version__, "llama_cpp": _llama_cpp_version(), "engines": engines,
            "wall_s": round(time.perf_counter() - t0, 1), "command": "python scripts/pass_cost.py " + shlex.join(
                argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    write_outputs(out, cells, meta)
    report(cells, a)
    print(f"\n{len(cells)} cells in {meta['wall_s']} s -> {out}")


def report(cells: list[dict], a) -> None:
    print(table(cells))
    text = outlook(cells, a.beta, a.nodes, a.overhead_ms)
    if text:
        print("\n" + text)


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


if __name__ == "__main__":
    main()
