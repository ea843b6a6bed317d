"""Benchmark every decoding method on one bench, in one run, and tabulate them against HF `generate`.

    python scripts/benchmark.py --bench mt_bench --question-file ../shared/data/mt_bench/question.jsonl \
        --ctc-draft ctc_drafter/assets/default_draft --ce-draft runs/ce --out runs/bench/mt_bench \
        [--question-end 80] [--max-new-tokens 256] [--budget 4] [--chunk 8 | --spread 10] \
        [--dtypes float32,bfloat16] [--cpu-kernels auto|packed|stock] [--threads auto|N] \
        [--draft ar=runs/ar-draft ...] [--ctc-ab ref=runs/ref ...] [--default-with ref=runs/ref ...] [--part 1/2]

Two processes, one per core, each its half of the windows, then one table over both:
    python scripts/benchmark.py ... --spread 10 --part 1/2 --out runs/b/p1 &
    python scripts/benchmark.py ... --spread 10 --part 2/2 --out runs/b/p2 &
    wait; python scripts/benchmark.py ... --no-run --out runs/b --answers-from runs/b/p1 runs/b/p2

Runs (resumably: each is an `ctc-drafter eval` answer file) the CTC draft with each tree policy, the
n-gram proposer, the hybrid (CTC + n-gram; `ctc-prefix-always`, `hybrid-always`: with --always-speculate), the CE (Medusa-style) ablation, our vanilla loop, HF
`generate` greedy, HF prompt-lookup decoding and, when llama-cpp-python is installed, llama.cpp's own
greedy on the base's GGUF (`llamacpp-greedy`, with --threads; a line says when it is skipped); then writes summary.md, summary.json and summary.png in --out. Every method is compared
with HF `generate` greedy: speedup (gamma), beta, the accepted-length histogram, token-exact agreement
and, for GSM8K, accuracy. With several --dtypes every method runs in each (named `<method>@<dtype>`)
and is compared with HF `generate` in the same dtype.

The questions go in windows of --chunk: every method answers a window before the next window starts,
and the summary is rewritten after each. A full bench takes hours on a CPU, so a run stopped at any
point (or spread over several sessions) still leaves a like-for-like comparison: the summary only
counts questions that every method has answered, timed under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ctc_drafter.models.compiled_base import COMPILED


def base_methods(a) -> list[tuple[str, list[str]]]:
    budget = ["--budget", str(a.budget)] if a.budget else []
    out = [("hf-generate", ["--engine", "hf"]),
           ("vanilla", ["--baseline"]),
           ("ctc-beam", ["--draft-model", a.ctc_draft, "--proposer", "ctc", "--generator", "beam"] + budget),
           ("ctc-medusa", ["--draft-model", a.ctc_draft, "--proposer", "ctc", "--generator", "medusa"]
            + (["--budget", str(a.medusa_budget)] if a.medusa_budget else [])),
           ("ctc-prefix", ["--draft-model", a.ctc_draft, "--proposer", "ctc", "--generator", "prefix"] + budget),
           # the draft on every step (the switch off): its acceptance, which the beta targets are about
           ("ctc-prefix-always", ["--draft-model", a.ctc_draft, "--proposer", "ctc", "--generator", "prefix",
                                  "--always-speculate"] + budget),
           ("ngram", ["--proposer", "ngram"] + budget),
           # the hybrid asking its draft on every step (the switch off): what the switch adds
           ("hybrid-always", ["--draft-model", a.ctc_draft, "--proposer", "hybrid", "--generator", "prefix",
                              "--always-speculate"] + budget),
           ("hybrid", ["--draft-model", a.ctc_draft, "--proposer", "hybrid", "--generator", "prefix"] + budget),
           ("hf-prompt-lookup", ["--engine", "hf-prompt-lookup"])]
    if a.ce_draft:
        out.insert([m[0] for m in out].index("ngram"), ("ce-beam", ["--draft-model", a.ce_draft, "--proposer", "ctc", "--generator", "beam"] + budget))
    # more drafts (e.g. the autoregressive heads): alone (`prefix`; `-always`: on every step, their acceptance)
    # and in the hybrid
    alone, hybrid = [], []
    for spec in getattr(a, "draft", None) or []:
        name, path = spec.split("=", 1)
        prefix = ["--draft-model", path, "--proposer", "ctc", "--generator", "prefix"] + budget
        alone += [(f"{name}-prefix", prefix), (f"{name}-prefix-always", prefix + ["--always-speculate"])]
        hybrid.append((f"{name}-hybrid", ["--draft-model", path, "--proposer", "hybrid", "--generator", "prefix"]
                       + budget))
    out = out[:-2] + alone + out[-2:-1] + hybrid + out[-1:]
    # a CTC draft alone on every step with its default tree, the CTC transform on and off (NAME-on, NAME-off)
    for spec in getattr(a, "ctc_ab", None) or []:
        name, path = spec.split("=", 1)
        alone = ["--draft-model", path, "--proposer", "ctc", "--always-speculate"]
        out += [(f"{name}-on", alone + ["--ctc-transform", "on"]), (f"{name}-off", alone + ["--ctc-transform", "off"])]
    # a draft in the engine's defaults (the hybrid, its tree policy and budget, the speculation switch)
    out += [(f"{spec.split('=', 1)[0]}-default", ["--draft-model", spec.split("=", 1)[1]])
            for spec in getattr(a, "default_with", None) or []]
    # our loop on a compiled backend: its own greedy (BACKEND-vanilla) and the defaults on it (BACKEND-default)
    for backend in getattr(a, "backend_also", None) or []:
        out += [(f"{backend}-vanilla", ["--baseline", "--backend", backend]),
                (f"{backend}-default", ["--draft-model", a.ctc_draft, "--backend", backend])]
    return [m for m in out if not a.only or m[0] in a.only.split(",")]


LLAMA_ROW = "llamacpp-greedy"


def llama_row(a) -> tuple[list[tuple[str, list[str]]], str]:
    """([(LLAMA_ROW, eval options)], '') when llama.cpp can run the base, else ([], the line saying why not).
    One row whatever --dtypes: the GGUF's weights do not change with our dtype."""
    from ctc_drafter.evaluation.llamacpp_engine import llama_cpp_missing

    reason, base = llama_cpp_missing(), getattr(a, "base_model", "default")
    if not reason and base != "default" and not base.endswith(".gguf"):
        reason = f"the base {base} is not a GGUF (llama.cpp runs --base-model default or a .gguf)"
    if reason or (getattr(a, "only", None) and LLAMA_ROW not in a.only.split(",")):
        return [], f"{LLAMA_ROW} reference row skipped: {reason}" if reason else ""
    return [(LLAMA_ROW, ["--engine", "llamacpp", "--threads", str(getattr(a, "threads", "auto"))])], ""


def dtypes(a) -> list[str]:
    return (getattr(a, "dtypes", None) or "auto").split(",")


def method_name(name: str, dtype: str, a) -> str:
    return name if len(dtypes(a)) == 1 else f"{name}@{dtype}"


def methods(a) -> list[tuple[str, list[str]]]:
    """Every method in every dtype; ours also with the kernel and thread choice given (HF runs stock)."""
    ours = ["--cpu-kernels", a.cpu_kernels, "--threads", str(a.threads)] if hasattr(a, "cpu_kernels") else []
    out = []
    for dtype in dtypes(a):
        for name, extra in base_methods(a):
            mine = [] if name.startswith("hf-") else ours
            out.append((method_name(name, dtype, a), extra + mine + ["--dtype", dtype]))
    for dtype in getattr(a, "hf_also", None) or []:  # HF generate in another dtype: a second reference
        if dtype not in dtypes(a):
            out.append((f"hf-generate@{dtype}", ["--engine", "hf", "--dtype", dtype]))
    return out + llama_row(a)[0]


def baseline_of(name: str) -> str:
    """The method a method is compared with: HF generate in its dtype; on a compiled backend, that engine's
    own greedy (its losslessness is with respect to it; BACKEND-vanilla itself is compared with HF)."""
    dtype = name[name.index("@"):] if "@" in name else ""
    backend = next((b for b in COMPILED if name.startswith(b + "-")), None)
    if backend and not name.startswith(f"{backend}-vanilla"):
        return f"{backend}-vanilla{dtype}"
    return "hf-generate" + dtype


def windows(a) -> list[tuple[int, int, int]]:
    """(begin, end, stride) question windows.

    --spread K: window j takes questions j, j+K, j+2K, ... (MT-bench is sorted by category, 10 each, so
    K = 10 gives one question of every category per window and a stopped run stays balanced);
    otherwise consecutive windows of --chunk selected questions, the stride kept aligned.
    """
    from ctc_drafter.evaluation.questions import load_questions

    n = len(load_questions(a.question_file, a.bench, a.question_begin, a.question_end, 1))
    end = a.question_begin + n
    if a.spread:
        if a.question_stride != 1:
            raise SystemExit("benchmark.py: error: --spread and --question-stride do not combine")
        return [(a.question_begin + j, end, a.spread) for j in range(min(a.spread, n))]
    if a.chunk <= 0:
        return [(a.question_begin, end, a.question_stride)]
    step = a.chunk * a.question_stride
    return [(b, min(b + step, end), a.question_stride) for b in range(a.question_begin, end, step)]


def parse_part(part: str | None, ap) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N; None -> (1, 1)."""
    if part is None:
        return 1, 1
    try:
        k, n = (int(x) for x in part.split("/"))
    except ValueError:
        ap.error(f"--part {part!r}: expected K/N, e.g. 1/2")
    if not 1 <= k <= n:
        ap.error(f"--part {part!r}: K must be between 1 and N")
    return k, n


def run_eval(a, name: str, extra: list[str], begin: int, end: int, stride: int) -> Path:
    answer = Path(a.out) / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "ctc_drafter", "eval", "--bench", a.bench, "--question-file", a.question_file,
           "--base-model", a.base_model, "--model-id", name, "--answer-file", str(answer),
           "--max-new-tokens", str(a.max_new_tokens), "--question-begin", str(begin), "--question-end", str(end),
           "--question-stride", str(stride)]
    print("+", " ".join(cmd + extra), flush=True)
    subprocess.run(cmd + extra, check=True)
    return answer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, choices=["mt_bench", "gsm8k"])
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--ctc-draft", required=True)
    ap.add_argument("--ce-draft", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--question-begin", type=int, default=0)
    ap.add_argument("--question-end", type=int, default=None)
    ap.add_argument("--question-stride", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=None, help="node budget for beam/prefix/ngram/hybrid (default: device's)")
    ap.add_argument("--medusa-budget", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset of methods to run")
    ap.add_argument("--chunk", type=int, default=8,
                    help="questions per window; every method answers a window before the next (0: no windows)")
    ap.add_argument("--spread", type=int, default=0,
                    help="windows of every K-th question instead (10 on MT-bench: one per category per window)")
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated base dtypes; every method runs in each, against HF generate in the same one")
    ap.add_argument("--cpu-kernels", default="auto", choices=["auto", "packed", "stock"],
                    help="our loop's CPU kernels (give one explicitly for a bench spread over sessions: auto may "
                         "time differently on a busy machine, and eval refuses to resume with other kernels)")
    ap.add_argument("--threads", default="auto", help="our loop's torch threads: auto or N")
    ap.add_argument("--no-run", action="store_true", help="only tabulate existing answer files")
    ap.add_argument("--hf-also", action="append", metavar="DTYPE",
                    help="HF generate also in this dtype (e.g. float32 beside bf16 runs): a column of speedups "
                         "against it, since the fastest HF setting on a CPU is not always the model's own dtype")
    ap.add_argument("--draft", action="append", metavar="NAME=PATH",
                    help="another draft to run with the `prefix` policy as methods NAME-prefix, NAME-prefix-always "
                         "(every step) and NAME-hybrid (repeatable)")
    ap.add_argument("--ctc-ab", action="append", metavar="NAME=PATH",
                    help="a CTC draft alone on every step with its default tree, the CTC transform on and off: "
                         "methods NAME-on and NAME-off (repeatable)")
    ap.add_argument("--default-with", action="append", metavar="NAME=PATH",
                    help="the engine's defaults (hybrid proposer, default tree and budget, the switch) with this "
                         "draft: method NAME-default (repeatable)")
    ap.add_argument("--backend-also", action="append", metavar="BACKEND", choices=list(COMPILED),
                    help="our loop on a compiled backend too: methods BACKEND-vanilla (its own greedy) and "
                         "BACKEND-default (the defaults on it, compared with BACKEND-vanilla) (repeatable)")
    ap.add_argument("--part", default=None, metavar="K/N",
                    help="run only windows K, K+N, K+2N, ... (1-based): N processes share one bench")
    ap.add_argument("--answers-from", nargs="+", default=[], metavar="DIR",
                    help="with --no-run: tabulate the answer files of these folders together (the --part runs)")
    a = ap.parse_args()
    skipped = llama_row(a)[1]
    if skipped:
        print(skipped, flush=True)
    for flag, specs in (("--draft", a.draft), ("--ctc-ab", a.ctc_ab), ("--default-with", a.default_with)):
        for spec in specs or []:
            if "=" not in spec:
                ap.error(f"{flag} {spec!r}: expected NAME=PATH")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.answers_from:
        files = {name: [Path(d) / f"{name}.jsonl" for d in a.answers_from] for name, _ in methods(a)}
    else:
        files = {name: Path(a.out) / f"{name}.jsonl" for name, _ in methods(a)}
    if not a.no_run:
        wins = windows(a)
        k, n = parse_part(a.part, ap)
        for i, (begin, end, stride) in enumerate(wins, 1):
            if (i - 1) % n != k - 1:
                continue
            print(f"== window {i}/{len(wins)}: questions [{begin}, {end}) every {stride}", flush=True)
            for name, extra in methods(a):
                run_eval(a, name, extra, begin, end, stride)
            summarize(a, files)
    else:
        summarize(a, files)


def summarize(a, files: dict[str, Path]) -> None:
    from ctc_drafter.evaluation.report import build_report

    files = {n: [p for p in (f if isinstance(f, list) else [f]) if p.exists()] for n, f in files.items()}
    files = common_questions({n: f for n, f in files.items() if f}, Path(a.out) / "common")
    rows = {}
    extra_refs = {f"hf-generate@{d}" for d in getattr(a, "hf_also", None) or [] if d not in dtypes(a)} | {LLAMA_ROW}
    for name, f in files.items():
        # the extra HF reference is compared with HF in the bench's (first) dtype: how often the two agree
        ref = method_name("hf-generate", dtypes(a)[0], a) if name in extra_refs else baseline_of(name)
        base = files.get(ref)
        if base is None:
            print(f"{name}: no {ref} answers yet to compare with", flush=True)
            continue
        rows[name] = build_report(str(f), str(base), question_file=a.question_file,
                                  gsm8k_file=a.question_file if a.bench == "gsm8k" else None)
    if not rows:
        return
    Path(a.out, "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    # a second HF reference (--hf-also): its tokens/s over the same questions, as measured in its own row
    also = {n: rows[n]["tokens_per_s"]["spec"] for n in sorted(extra_refs) if n in rows}
    lines = ["| method | tokens/s | speedup vs its reference (HF generate, same dtype; a backend's own greedy) | "
             + "".join(f"vs {n} | " for n in also) + "beta | node budget | token-identical to its reference | accuracy |",
             "|---|---|---|" + "---|" * len(also) + "---|---|---|---|"]
    for name, r in rows.items():
        meta = r["meta"]["spec"] or {}
        acc = r.get("gsm8k_accuracy") or {}
        acc_s = f"{acc['spec_correct']}/{acc['n']}" if acc else "-"
        vs = "".join(f"{r['tokens_per_s']['spec'] / t:.2f}x | " for t in also.values())
        lines.append(f"| {name} | {r['tokens_per_s']['spec']:.2f} | {r['gamma']:.2f}x (mean {r['gamma_mean']:.2f}x) | "
                     f"{vs}{r['beta']:.2f} | {meta.get('budget') or '-'} | {r['n_identical']}/{r['n_questions']} | {acc_s} |")
    refs = {n: baseline_of(n) for n in rows if baseline_of(n) != method_name("hf-generate", dtypes(a)[0], a)
            and n not in extra_refs}
    hist_lines = ([""] + [f"- {n}: speedup and identity against {ref} (that engine's own greedy)"
                          for n, ref in refs.items()] if refs else [])
    hist_lines += ["", "Accepted tokens per step (share of steps):", ""]
    for name, r in rows.items():
        h = r.get("accept_length_hist") or {}
        tot = sum(h.values()) or 1
        hist_lines.append(f"- {name}: " + ", ".join(f"{k}: {v / tot:.1%}" for k, v in sorted(h.items(), key=lambda kv: int(kv[0]))))
    rates = {n: r.get("accept_rate_by_depth") or {} for n, r in rows.items()}
    if any(len(v) > 1 for v in rates.values()):
        hist_lines += ["", "Draft token d accepted, given the d - 1 before it were (all passes, prefill included):", ""]
        hist_lines += [f"- {n}: " + ", ".join(f"{d}: {v:.1%}" for d, v in rate.items()) for n, rate in rates.items() if rate]
    arms = {n: arm_steps(files[n]) for n in rows}
    if any(arms.values()):
        hist_lines += ["", "How the speculation switch took the steps (share of steps after the prefill):", ""]
        for name, counts in arms.items():
            tot = sum(counts.values())
            if tot:
                hist_lines.append(f"- {name}: " + ", ".join(f"{k} {v / tot:.1%}" for k, v in counts.items()))
    text = "\n".join(lines + hist_lines) + "\n"
    Path(a.out, "summary.md").write_text(text)
    print(text)
    plot(rows, Path(a.out, "summary.png"), a.bench)


def arm_steps(path: Path) -> dict[str, int]:
    """Steps per arm of the speculation switch over an answer file (decoding/switch.py; {} without it)."""
    tot: dict[str, int] = {}
    for r in _records(path):
        for c in r.get("choices") or []:
            for turn in c.get("arm_steps") or []:
                for k, v in (turn or {}).items():
                    tot[k] = tot.get(k, 0) + v
    return tot


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill; eval's resume redoes that question
            continue
        if isinstance(r, dict) and "question_id" in r:
            out.append(r)
    return out


def common_questions(files: dict[str, Path | list[Path]], out_dir: Path) -> dict[str, Path]:
    """Copies of the answer files (a method's several files read as one) cut to the questions every method answered."""
    recs = {n: [r for p in (f if isinstance(f, list) else [f]) for r in _records(p)] for n, f in files.items()}
    ids = [{json.dumps(r["question_id"]) for r in rs} for rs in recs.values()]
    common = set.intersection(*ids) if ids else set()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, rs in recs.items():
        keep = [r for r in rs if json.dumps(r["question_id"]) in common]
        if keep:
            out[n] = out_dir / f"{n}.jsonl"
            out[n].write_text("".join(json.dumps(r) + "\n" for r in keep))
    print(f"summary over the {len(common)} questions all {len(recs)} methods have answered", flush=True)
    return out


def plot(rows: dict, out: Path, bench: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [rows[n]["gamma"] for n in names], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    axes[0].set_title(f"{bench}: speedup over HF generate (tokens/s ratio)")
    axes[1].bar(names, [rows[n]["beta"] for n in names], color="tab:green")
    axes[1].set_title("beta: tokens per base forward pass")
    for n in names:
        h = rows[n].get("accept_length_hist") or {}
        if n.startswith(("ctc", "ce")) and h:
            ks = sorted(int(k) for k in h)
            tot = sum(h.values())
            axes[2].plot(ks, [h[str(k)] / tot for k in ks], marker="o", label=n)
    axes[2].set_title("accepted tokens per step")
    axes[2].set_xlabel("tokens emitted by one verification step")
    axes[2].set_ylabel("share of steps")
    axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
