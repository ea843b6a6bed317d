"""The report as text (`format_report`, what `report` prints) and as one figure (`plot_report`, --plot)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import CTCDrafterError, writing


def _f(v, fmt="{:.2f}", none="n/a"):
    return none if v is None else fmt.format(v)


def format_report(r: dict) -> str:
    m = r["meta"]["spec"]
    eng = r.get("engines") or {}
    lines = [f"speculative: {r['spec_model_id']} ({r['spec_file']})",
             f"  engine:    {eng.get('spec', 'unknown')}",
             f"baseline:    {r['baseline_model_id']} ({r['baseline_file']})",
             f"  engine:    {eng.get('baseline', 'unknown')}"]
    if m:
        sha = f" (sha256 {m['draft_sha256']})" if m.get("draft_sha256") else ""
        draft = f", draft {m.get('draft_model')}{sha}" if m.get("draft_model") else ""
        lines.append(f"setup: {m.get('base_model')} on {m.get('device')} ({m.get('dtype')}){draft}, temperature "
                     f"{m.get('temperature')}, max_new_tokens {m.get('max_new_tokens')}")
    lines.append(f"bench: {r['bench'] or 'unknown'}, {r['n_questions']} question(s) compared")
    lines.append("")
    head = f"{'category':<14}{'n':>4}{'spec tok/s':>12}{'base tok/s':>12}{'gamma':>8}{'gamma_mean':>12}{'beta':>7}"
    lines += [head, "-" * len(head)]
    rows = list(r["per_category"].items())
    if len(rows) > 1 or not rows:
        rows.append(("all", {"n": r["n_questions"], "spec_tokens_per_s": r["tokens_per_s"]["spec"],
                             "baseline_tokens_per_s": r["tokens_per_s"]["baseline"], "gamma": r["gamma"],
                             "gamma_mean": r["gamma_mean"], "beta": r["beta"]}))
    for cat, c in rows:
        lines.append(f"{cat[:14]:<14}{c['n']:>4}{_f(c['spec_tokens_per_s'], '{:.1f}'):>12}"
                     f"{_f(c['baseline_tokens_per_s'], '{:.1f}'):>12}{_f(c['gamma'], '{:.2f}x'):>8}"
                     f"{_f(c['gamma_mean'], '{:.2f}x'):>12}{_f(c['beta']):>7}")
    lines.append("")
    lines.append(f"gamma (speedup, total tokens/s ratio):   {_f(r['gamma'], '{:.3f}x')}")
    lines.append(f"gamma_mean (mean per-question speedup):  {_f(r['gamma_mean'], '{:.3f}x')}")
    lines.append(f"beta (tokens per verification step):     {_f(r['beta'], '{:.3f}')}   "
                 f"(baseline {_f(r['beta_baseline'], '{:.3f}')})")
    hist = r["accept_length_hist"]
    if hist:
        total = sum(hist.values())
        lines.append("tokens accepted per step:")
        for k, n in hist.items():
            lines.append(f"  {k:>3}: {n:>6} {100 * n / total:5.1f}% {'#' * max(1, round(40 * n / total)) if n else ''}")
    if r.get("accept_rate_by_depth"):
        lines.append("draft token d accepted, given the d - 1 before it were: "
                     + ", ".join(f"{d}: {100 * v:.1f}%" for d, v in r["accept_rate_by_depth"].items()))
    lines.append(f"agreement with baseline ({r['agreement_by']}): {r['n_identical']}/{r['n_questions']} questions "
                 f"identical ({r['agreement']:.3f})")
    for d in r["divergences"][:10]:
        where = f"{d['by']} {d['index']}" if d["index"] is not None else "turn count"
        lines.append(f"  question {d['question_id']}: first differs at turn {d['turn'] + 1}, {where}")
    if len(r["divergences"]) > 10:
        lines.append(f"  ... and {len(r['divergences']) - 10} more")
    for m in r.get("divergence_margins") or []:
        if "skipped" in m:
            lines.append(f"  margin, question {m['question_id']}: not computed ({m['skipped']})")
        else:
            lines.append(f"  margin, question {m['question_id']} turn {m['turn'] + 1} token {m['index']}: top-2 logit "
                         f"margin {m['top2_margin']:.4f}, gap between the two chosen tokens {m['chosen_gap']:.4f}")
    acc = r["gsm8k_accuracy"]
    if acc:
        lines.append(f"GSM8K accuracy: speculative {acc['spec_correct']}/{acc['n']} ({100 * acc['spec']:.1f}%), "
                     f"baseline {acc['baseline_correct']}/{acc['n']} ({100 * acc['baseline']:.1f}%)")
    if r["notes"]:
        lines.append("notes:")
        lines += [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)


# ---- plot --------------------------------------------------------------------------------------

def plot_report(r: dict, out: str | Path) -> None:
    """One PNG: speedup per category, beta per category, accepted-length histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CTCDrafterError("--plot needs matplotlib: pip install 'ctc-drafter[plot]'") from e

    cats = list(r["per_category"])
    if len(cats) > 1:
        cats.append("all")
    pc = dict(r["per_category"], all={"gamma": r["gamma"], "beta": r["beta"], "n": r["n_questions"]})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    _bars(axes[0], cats, [pc[c]["gamma"] for c in cats], "speedup γ: tokens/s vs baseline (dashed: 1×)",
          "speedup (×)", fmt="{:.2f}×", empty="speedup cannot be computed\n(token counts missing)")
    _bars(axes[1], cats, [pc[c]["beta"] for c in cats], "β: tokens per verification step (dashed: vanilla)",
          "tokens / step", fmt="{:.2f}", empty="β cannot be computed\n(no idxs)")
    ax = axes[2]
    hist = {int(k): v for k, v in r["accept_length_hist"].items()}
    if hist:
        ks = list(range(min(min(hist), 1), max(hist) + 1))
        total = sum(hist.values())
        ax.bar(ks, [100 * hist.get(k, 0) / total for k in ks], color="#4C72B0")
        ax.set_xticks(ks)
        ax.set_xlabel("tokens accepted in one step")
        ax.set_ylabel("% of steps")
    else:
        _empty(ax, "no per-step data\n(answer file has no accept_lengths)")
    ax.set_title("accepted length per step")
    title = (f"{r['spec_model_id']} vs {r['baseline_model_id']} — {r['bench'] or 'unknown bench'}, "
             f"{r['n_questions']} questions: γ {_f(r['gamma'], '{:.2f}×')}, β {_f(r['beta'])}, "
             f"agreement {100 * r['agreement']:.0f}%")
    acc = r.get("gsm8k_accuracy")
    if acc:
        title += f", GSM8K acc {100 * acc['spec']:.0f}% / {100 * acc['baseline']:.0f}%"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with writing(out, "the plot"):  # via a temporary file: a full disk leaves no half-written plot
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=110, format=plot_format(out))
            os.replace(tmp, out)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):  # on a read-only disk even removing a missing file fails
            tmp.unlink(missing_ok=True)


def plot_format(out: str | Path) -> str:
    """The image format --plot's file name asks for (png when it has no extension)."""
    import matplotlib.figure

    fmt = Path(out).suffix.lstrip(".").lower() or "png"
    known = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if fmt not in known:
        raise CTCDrafterError(f"--plot {out}: matplotlib cannot write .{fmt} files (use one of: "
                              f"{', '.join(sorted(known))})")
    return fmt


def _empty(ax, msg):
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(ax, cats, vals, title, ylabel, fmt, empty, ref=1.0):
    ax.set_title(title)
    if not cats or all(v is None for v in vals):
        _empty(ax, empty)
        return
    heights = [v or 0.0 for v in vals]
    colors = ["#DD8452" if c == "all" else "#4C72B0" for c in cats]
    bars = ax.bar(range(len(cats)), heights, color=colors, width=0.6)
    ax.set_xlim(-0.6, max(len(cats), 3) - 0.4)  # a lone category stays a bar, not a wall
    ax.axhline(ref, color="black", linestyle="--", linewidth=1)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), _f(v, fmt), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(max(heights), ref) * 1.18)
