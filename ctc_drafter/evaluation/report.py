"""Compare a speculative answer file with a baseline one: speedup, acceptance, agreement, accuracy.

    gamma       total tokens/s of the speculative run over that of the baseline
                (sum new_tokens / sum wall_time, each file), on the questions both answered
    gamma_mean  the paper's figure: the mean over questions of per-question speedups
    beta        tokens per base verification step: sum new_tokens / sum steps
    agreement   share of questions whose answers are identical token for token (texts when the files
                carry no token ids); greedy decoding is lossless, so this must be 1.0 there

Either side may come from any `eval --engine` (ours speculative or vanilla, HF generate, HF prompt
lookup); the report names each side's engine, so "gamma over HF generate" is read off the same table.
Reads this package's answer files and the reference implementation's (same FastChat schema, whose
`idxs` are 0-based loop indices, i.e. steps - 1, and whose baseline runs record `new_tokens` as 0).

This module builds the report (`build_report`: pairing, notes, categories, GSM8K accuracy); the answer
file's schema and reading are in answer_files.py, token counting in token_counts.py, the per-question
numbers and sums in answer_stats.py, the text and the plot in report_render.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import CTCDrafterError
from .answer_files import AnswerFile, engine_label, load_answer_file
from .answer_stats import acceptance_by_depth, by_token_ids, first_divergence, question_stats, summarize
from .questions import extract_final_number, gsm8k_references, question_index
from .report_render import format_report, plot_format, plot_report
from .token_counts import TokenCounter, calibration_turns

__all__ = ["build_report", "format_report", "plot_format", "plot_report", "load_answer_file"]


# ---- categories and GSM8K ----------------------------------------------------------------------

def _existing(path) -> str | None:
    return str(path) if path and Path(path).is_file() else None


def categories(keys: list[str], spec: AnswerFile, question_file: str | None, notes: list[str]) -> dict[str, str]:
    qfile = question_file or _existing(spec.meta.get("question_file"))
    index = question_index(qfile) if qfile else {}
    out = {}
    for k in keys:
        rec = spec.records[k]
        cat = rec.get("category") or (index.get(str(rec["question_id"])) or {}).get("category")
        out[k] = str(cat) if cat else ("gsm8k" if spec.bench == "gsm8k" else "unknown")
    unknown = sum(v == "unknown" for v in out.values())
    if unknown and qfile:
        notes.append(f"{unknown} question(s) have no category, neither in the answers nor in {qfile} (is it the "
                     "question file of this benchmark?)")
    elif unknown:
        notes.append(f"{unknown} question(s) have no category (the answers do not record them): pass --question-file")
    return out


def gsm8k_accuracy(keys: list[str], spec: AnswerFile, base: AnswerFile, gsm8k_file: str | None,
                   notes: list[str]) -> dict | None:
    path = gsm8k_file or (_existing(spec.meta.get("question_file")) if spec.bench == "gsm8k" else None)
    if path is None:
        if spec.bench == "gsm8k" or base.bench == "gsm8k":
            notes.append("GSM8K accuracy needs the reference answers: pass --gsm8k-file test.jsonl")
        return None
    refs = gsm8k_references(path)
    scored = [k for k in keys if str(spec.records[k]["question_id"]) in refs]
    if not scored:
        raise CTCDrafterError(f"none of the compared questions has a reference answer in {path}")

    def correct(f: AnswerFile) -> int:
        return sum(extract_final_number(f.records[k]["choices"][0]["turns"][-1]) ==
                   refs[str(f.records[k]["question_id"])] for k in scored)

    cs, cb = correct(spec), correct(base)
    return {"n": len(scored), "spec_correct": cs, "baseline_correct": cb, "spec": cs / len(scored),
            "baseline": cb / len(scored), "reference_file": str(path)}


# ---- the report --------------------------------------------------------------------------------

def _check_same_bench(spec: AnswerFile, base: AnswerFile, keys: list[str]) -> None:
    if spec.bench and base.bench and spec.bench != base.bench:
        raise CTCDrafterError(f"{spec.path} answers {spec.bench} but baseline {base.path} answers {base.bench}")
    for k in keys:
        na = [len(c["turns"]) for c in spec.records[k]["choices"]][:1]
        nb = [len(c["turns"]) for c in base.records[k]["choices"]][:1]
        if na != nb:
            raise CTCDrafterError(
                f"question {spec.records[k]['question_id']} has {na[0]} turn(s) in {spec.path} but {nb[0]} in "
                f"{base.path}: are they answers to the same benchmark?")


def _setup_notes(spec: AnswerFile, base: AnswerFile, notes: list[str]) -> None:
    """Warn where the two runs are not a like-for-like comparison."""
    if spec.meta.get("speculative") is False:
        notes.append(f"the speculative file is not a speculative run ({engine_label(spec)})")
    if base.meta.get("speculative") is True:
        notes.append(f"the baseline file is a speculative run ({engine_label(base)}), not vanilla decoding: gamma is "
                     "the speedup over it")
    for key in ("base_model", "device", "dtype", "max_new_tokens", "temperature", "template"):
        a, b = spec.meta.get(key), base.meta.get(key)
        if a is not None and b is not None and a != b:
            notes.append(f"the runs differ in {key}: {a} (speculative) vs {b} (baseline)")


def _count_notes(name: str, methods: Counter, notes: list[str]) -> None:
    if methods.get("token ids"):
        notes.append(f"{name}: {methods['token ids']} turn(s) record new_tokens 0; counted from stored token ids")
    if methods.get("loop steps"):
        notes.append(f"{name}: {methods['loop steps']} turn(s) record new_tokens 0 and no token ids; counted as "
                     "idxs + 1 tokens each (read as a plain decoding loop, which emits one token per step)")
    if methods.get("re-tokenized"):
        notes.append(f"{name}: {methods['re-tokenized']} turn(s) record new_tokens 0; counted by re-tokenizing the "
                     "text (approximate: stripped text, no end token)")
    if methods.get("missing"):
        notes.append(f"{name}: {methods['missing']} turn(s) record new_tokens 0 and no token ids, so gamma cannot "
                     "be computed; pass --tokenizer (or --base-model) to count tokens from the text")


def _plain_loop(f: AnswerFile) -> bool:
    """A reference-format file of vanilla decoding: one token per loop step (see TokenCounter)."""
    return not f.ours and f.meta.get("speculative") is not True


def build_report(spec_path, baseline_path, load_tokenizer=None, question_file: str | None = None,
                 gsm8k_file: str | None = None, tokenizer_name: str = "") -> dict:
    """Everything `report` prints, as one JSON-able dict. Notes starting "WARNING" are for stderr too."""
    spec = load_answer_file(spec_path, "speculative")
    base = load_answer_file(baseline_path, "baseline")
    keys = [k for k in spec.records if k in base.records]
    if not keys:
        raise CTCDrafterError(f"baseline {baseline_path} answers none of the {len(spec.records)} questions in "
                              f"{spec_path}")
    _check_same_bench(spec, base, keys)
    notes: list[str] = []
    only_spec, only_base = len(spec.records) - len(keys), len(base.records) - len(keys)
    if only_spec or only_base:
        notes.append(f"compared on the {len(keys)} questions both files answer ({only_spec} only in the "
                     f"speculative file, {only_base} only in the baseline)")
    for f, name in ((spec, "speculative"), (base, "baseline")):
        if not f.ours:
            notes.append(f"{name}: reference-format file; its idxs are read as 0-based loop indices (steps = idxs + 1)")
        if f.bad_lines:
            notes.append(f"{name}: {f.bad_lines} bad line(s) skipped")
        if f.duplicates:
            ids = ", ".join(map(str, f.duplicates[:5])) + (", ..." if len(f.duplicates) > 5 else "")
            notes.append(f"{name}: {len(f.duplicates)} repeated answer(s) to a question id ({ids}); the last answer "
                         "to each is used (as FastChat does), the earlier ones are dropped")
    _setup_notes(spec, base, notes)
    counter = TokenCounter(load_tokenizer, calibration_turns([spec, base], keys), tokenizer_name)
    m_spec, m_base = Counter(), Counter()
    s_stats = {k: question_stats(spec.records[k], counter, spec.ours, m_spec) for k in keys}
    b_stats = {k: question_stats(base.records[k], counter, base.ours, m_base, _plain_loop(base)) for k in keys}
    _count_notes("speculative", m_spec, notes)
    _count_notes("baseline", m_base, notes)
    if counter.unverified:
        notes.append(f"WARNING: no turn records its token count, so nothing checks that --tokenizer {tokenizer_name} "
                     "is the tokenizer of the model that wrote the answers; the re-counted speeds are only as right "
                     "as that choice")

    cats = categories(keys, spec, question_file, notes)
    per_cat = {}
    for cat in sorted(set(cats.values())):
        ks = [k for k in keys if cats[k] == cat]
        per_cat[cat] = summarize([s_stats[k] for k in ks], [b_stats[k] for k in ks])
    overall = summarize([s_stats[k] for k in keys], [b_stats[k] for k in keys])
    if overall["beta"] is None:
        notes.append("beta cannot be computed: the speculative file records no idxs (verification steps)")
    if overall["beta_baseline"] is not None and overall["beta_baseline"] < 0.999 and base.meta.get("speculative") \
            is not True:
        notes.append(f"WARNING: the baseline's tokens per step is {overall['beta_baseline']:.3f}, below the 1.0 any "
                     "decoding loop emits: its token counts are wrong (a re-count with another model's tokenizer?)")

    hist = Counter(a for k in keys for a in s_stats[k].accept)
    divergences = []
    for k in keys:
        d = first_divergence(spec.records[k], base.records[k])
        if d is not None:
            divergences.append({"question_id": spec.records[k]["question_id"], **d})
    by_ids = all(by_token_ids(spec.records[k], base.records[k]) for k in keys)
    temps = {spec.meta.get("temperature"), base.meta.get("temperature")} - {None}
    if any(t > 0 for t in temps):
        notes.append("sampled runs (temperature > 0): answers are not expected to match token for token")

    return {
        "spec_file": spec.path, "baseline_file": base.path,
        "spec_model_id": spec.model_id, "baseline_model_id": base.model_id,
        "engines": {"spec": engine_label(spec), "baseline": engine_label(base)},
        "bench": spec.bench or base.bench,
        "n_questions": len(keys),
        "gamma": overall["gamma"], "gamma_mean": overall["gamma_mean"],
        "beta": overall["beta"], "beta_baseline": overall["beta_baseline"],
        "tokens_per_s": {"spec": overall["spec_tokens_per_s"], "baseline": overall["baseline_tokens_per_s"]},
        "new_tokens": {"spec": overall["spec_new_tokens"], "baseline": overall["baseline_new_tokens"]},
        "wall_s": {"spec": overall["spec_wall_s"], "baseline": overall["baseline_wall_s"]},
        "per_category": per_cat,
        "accept_length_hist": {str(a): hist[a] for a in sorted(hist)},
        "accept_rate_by_depth": {str(d): r for d, r in acceptance_by_depth(hist).items()},
        "agreement": (len(keys) - len(divergences)) / len(keys),
        "agreement_by": "token ids" if by_ids else "text",
        "n_identical": len(keys) - len(divergences),
        "divergences": divergences,
        "gsm8k_accuracy": gsm8k_accuracy(keys, spec, base, gsm8k_file, notes),
        "token_count": {"spec": dict(m_spec), "baseline": dict(m_base)},
        "meta": {"spec": spec.meta, "baseline": base.meta},
        "notes": notes,
    }
