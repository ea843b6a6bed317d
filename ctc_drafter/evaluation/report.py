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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CTCDrafterError, writing
from .eval import ANSWER_FORMAT
from .questions import extract_final_number, gsm8k_references, question_index, read_jsonl


# ---- reading answer files ----------------------------------------------------------------------

@dataclass
class AnswerFile:
    path: str
    records: dict[str, dict]  # json-encoded question_id -> record (last one wins, as FastChat's reorg)
    bad_lines: int = 0
    duplicates: list = field(default_factory=list)  # question ids answered more than once (earlier ones dropped)

    @property
    def first(self) -> dict:
        return next(iter(self.records.values()))

    @property
    def meta(self) -> dict:
        return self.first.get("meta") or {}

    @property
    def model_id(self) -> str:
        return str(self.first.get("model_id", Path(self.path).stem))

    @property
    def ours(self) -> bool:
        """Written by `ctc-drafter eval` (idxs = steps) rather than the reference code (idxs = steps - 1)."""
        return self.meta.get("format") == ANSWER_FORMAT

    @property
    def bench(self) -> str | None:
        return self.first.get("bench") or self.meta.get("bench")


def engine_label(f: AnswerFile) -> str:
    """Which decoder produced a file, in words: the rows of the benchmark table (ours vs HF)."""
    m = f.meta
    if not f.ours:
        return "reference implementation" if m else "unknown (the file records no meta)"
    engine = m.get("engine", "ours")  # files written before HF engines existed are ours
    if engine == "hf":
        return "HF generate"
    if engine == "hf-prompt-lookup":
        return f"HF prompt lookup (K={m.get('prompt_lookup_tokens')})"
    kernels = m.get("kernels")
    packed = f", {kernels} CPU kernels" if isinstance(kernels, str) and kernels != "stock" else ""
    if not m.get("speculative"):
        return f"ours, vanilla{packed}"
    untrained = ", untrained draft" if m.get("draft_trained") is False else ""
    who = f"{m['proposer']} {m.get('generator') or ''}".strip() if m.get("proposer") else m.get("generator")
    return f"ours, speculative ({who}, budget {m.get('budget')}{untrained}{packed})"


def load_answer_file(path: str | Path, what: str) -> AnswerFile:
    rows, bad = read_jsonl(path, f"{what} answer file")
    records, duplicates = {}, []
    for n, obj in rows:
        _check_record(obj, f"{path}:{n}")
        key = json.dumps(obj["question_id"])
        if key in records:
            duplicates.append(obj["question_id"])
        records[key] = obj
    if not records:
        raise CTCDrafterError(f"{what} answer file {path} has no answers" + (f" ({bad} bad lines)" if bad else ""))
    return AnswerFile(str(path), records, bad, duplicates)


MAX_COUNT = 10**15  # past any token count, step count or wall time; keeps sums exact and floats finite


def _is_count(x) -> bool:
    """A finite non-negative JSON number (json.loads accepts NaN, Infinity and 400-digit ints; a bool is
    not a count)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return 0 <= x <= MAX_COUNT if isinstance(x, int) else math.isfinite(x) and 0 <= x <= MAX_COUNT


# meta fields the report compares or does arithmetic on, and the JSON types they may have (or null)
_META_TYPES = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "max_new_tokens": int,
               "budget": int, "speculative": bool, "draft_trained": bool}


def _check_record(obj: dict, where: str) -> None:
    """The fields `report` reads, with the JSON types it relies on; anything else is left alone."""
    qid = obj.get("question_id")
    if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise CTCDrafterError(f"{where} is not an answer record (needs a question_id, an integer or a string)")
    if not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise CTCDrafterError(f"{where} is not an answer record (needs question_id and choices)")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise CTCDrafterError(f"{where}: 'meta' must be a JSON object")
    for key, kinds in _META_TYPES.items():
        v = (meta or {}).get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and kinds is not bool)
                              or (isinstance(v, float) and not math.isfinite(v))):
            raise CTCDrafterError(f"{where}: meta '{key}' has the wrong type ({json.dumps(v)})")
    for key in ("category", "bench", "model_id"):
        if obj.get(key) is not None and not isinstance(obj[key], (str, int)):
            raise CTCDrafterError(f"{where}: '{key}' must be a string")
    for c in obj["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("turns"), list):
            raise CTCDrafterError(f"{where}: every choice needs a 'turns' list")
        if not all(isinstance(t, str) for t in c["turns"]):
            raise CTCDrafterError(f"{where}: every turn must be a string")
        for key in ("new_tokens", "idxs", "wall_time"):
            v = c.get(key)
            if v is not None and not (isinstance(v, list) and all(_is_count(x) for x in v)):
                raise CTCDrafterError(f"{where}: '{key}' must be a list of finite non-negative numbers")
        for key in ("tokens", "accept_lengths"):
            v = c.get(key)
            if v is not None and not (isinstance(v, list) and all(
                    t is None or (isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in t)) for t in v)):
                raise CTCDrafterError(f"{where}: '{key}' must be a list of integer lists, one per turn")


# ---- per-question numbers ----------------------------------------------------------------------

# A re-count with the files' own tokenizer differs from a recorded count by the end token and
# stripped whitespace: a token or two a turn. Past this, the tokenizer is another model's.
RECOUNT_TOLERANCE = (0.05, 2)  # (share of the recorded tokens, tokens per turn)
CALIBRATION_TURNS = 64


class TokenCounter:
    """Tokens of one turn, by the first rule that applies:

    recorded      the file's own new_tokens
    token ids     the stored ids (exact)
    loop steps    a plain decoding loop (the reference implementation's baseline files, which record
                  new_tokens 0) emits one token per step: idxs + 1 tokens, idxs being its last
                  0-based loop index; exact, and what its speculative files confirm
    re-tokenized  the text, re-counted with --tokenizer (approximate: stripped text, no end token),
                  after checking that tokenizer against the turns whose counts the files record
    """

    def __init__(self, load_tokenizer=None, calibration: list[tuple[str, int]] | None = None, name: str = ""):
        self._load = load_tokenizer
        self._tok = None
        self.calibration = (calibration or [])[:CALIBRATION_TURNS]
        self.name = name
        self.unverified = False  # re-counted with a tokenizer no recorded count could check

    def _tokenizer(self):
        if self._tok is None and self._load is not None:
            self._tok = self._load()
            self._check_tokenizer()
        return self._tok

    def _encode_len(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False))

    def _check_tokenizer(self) -> None:
        """Refuse a tokenizer whose counts of recorded turns are off: it belongs to another model."""
        if not self.calibration:
            self.unverified = True
            return
        recorded = sum(n for _, n in self.calibration)
        recount = sum(self._encode_len(t) for t, _ in self.calibration)
        off = sum(abs(self._encode_len(t) - n) for t, n in self.calibration)
        share, per_turn = RECOUNT_TOLERANCE
        if off > share * recorded + per_turn * len(self.calibration):
            raise CTCDrafterError(
                f"--tokenizer {self.name} does not match the answer files' model: on {len(self.calibration)} turn(s) "
                f"whose token counts the files record ({recorded} tokens) it counts {recount}; a re-count with it "
                "would give wrong speeds. Give the tokenizer of the model that wrote the answers")

    def count(self, choice: dict, j: int, plain_loop: bool = False) -> tuple[int | None, str]:
        n = recorded_count(choice, j)
        if n is not None:
            return n, "recorded" if _recorded(choice, j) else "token ids"
        idxs = choice.get("idxs")
        if plain_loop and isinstance(idxs, list) and j < len(idxs):
            return int(idxs[j]) + 1, "loop steps"
        tok = self._tokenizer()
        if tok is not None:
            return self._encode_len(choice["turns"][j]), "re-tokenized"
        return None, "missing"


def _recorded(choice: dict, j: int) -> bool:
    nt = choice.get("new_tokens")
    return isinstance(nt, list) and j < len(nt) and nt[j] > 0


def recorded_count(choice: dict, j: int) -> int | None:
    """Turn j's tokens as the file records them (new_tokens, else stored ids), or None."""
    if _recorded(choice, j):
        return int(choice["new_tokens"][j])
    ids = choice.get("tokens")
    if isinstance(ids, list) and j < len(ids) and isinstance(ids[j], list) and ids[j]:
        return len(ids[j])
    return None


def calibration_turns(files: list["AnswerFile"], keys: list[str]) -> list[tuple[str, int]]:
    """(text, recorded count) of turns whose token count a file records: the yardstick for --tokenizer."""
    out = []
    for f in files:
        for k in keys:
            for c in f.records[k]["choices"]:
                for j, text in enumerate(c["turns"]):
                    n = recorded_count(c, j)
                    if n is not None and text.strip():
                        out.append((text, n))
                        if len(out) >= CALIBRATION_TURNS:
                            return out
    return out


@dataclass
class QuestionStats:
    tokens: int | None = 0  # None: some turn's count is unknown
    wall: float = 0.0
    steps: int | None = 0  # None: some turn has no idxs
    accept: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall if self.tokens is not None and self.wall > 0 else None


def question_stats(rec: dict, counter: TokenCounter, ours: bool, methods: Counter,
                   plain_loop: bool = False) -> QuestionStats:
    s = QuestionStats()
    step_offset = 0 if ours else 1  # reference idxs are the last 0-based loop index
    for c in rec["choices"]:
        walls, idxs, acc = c.get("wall_time") or [], c.get("idxs"), c.get("accept_lengths")
        for j in range(len(c["turns"])):
            n, how = counter.count(c, j, plain_loop)
            methods[how] += 1
            s.tokens = None if n is None or s.tokens is None else s.tokens + n
            s.wall += float(walls[j]) if j < len(walls) else 0.0
            has_step = isinstance(idxs, list) and j < len(idxs) and isinstance(idxs[j], (int, float))
            s.steps = s.steps + int(idxs[j]) + step_offset if has_step and s.steps is not None else None
            if isinstance(acc, list) and j < len(acc) and isinstance(acc[j], list):
                s.accept += [int(a) for a in acc[j]]
    return s


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(spec: list[QuestionStats], base: list[QuestionStats]) -> dict:
    """gamma, gamma_mean, beta and throughput over paired per-question stats."""
    def tot(stats, key):
        vals = [getattr(s, key) for s in stats]
        return None if any(v is None for v in vals) else sum(vals)

    st, sw, ss = tot(spec, "tokens"), tot(spec, "wall"), tot(spec, "steps")
    bt, bw, bs = tot(base, "tokens"), tot(base, "wall"), tot(base, "steps")
    spec_tps, base_tps = _ratio(st, sw), _ratio(bt, bw)
    per_q = [_ratio(a.tokens_per_s, b.tokens_per_s) for a, b in zip(spec, base)]
    return {
        "n": len(spec),
        "gamma": _ratio(spec_tps, base_tps),
        "gamma_mean": None if not per_q or any(g is None for g in per_q) else sum(per_q) / len(per_q),
        "beta": _ratio(st, ss),
        "beta_baseline": _ratio(bt, bs),
        "spec_tokens_per_s": spec_tps,
        "baseline_tokens_per_s": base_tps,
        "spec_new_tokens": st,
        "baseline_new_tokens": bt,
        "spec_wall_s": sw,
        "baseline_wall_s": bw,
    }


# ---- agreement ---------------------------------------------------------------------------------

def first_divergence(a: dict, b: dict) -> dict | None:
    """Where the answers of two records first differ: None if identical, else turn and token/char index."""
    for ci, (ca, cb) in enumerate(zip(a["choices"], b["choices"])):
        ta, tb = ca["turns"], cb["turns"]
        ia, ib = ca.get("tokens"), cb.get("tokens")
        for j in range(max(len(ta), len(tb))):
            if j >= len(ta) or j >= len(tb):
                return {"choice": ci, "turn": j, "by": "turns", "index": None}
            use_ids = (isinstance(ia, list) and isinstance(ib, list) and j < len(ia) and j < len(ib))
            xa, xb = (ia[j], ib[j]) if use_ids else (ta[j], tb[j])
            if xa != xb:
                k = next((k for k, (u, v) in enumerate(zip(xa, xb)) if u != v), min(len(xa), len(xb)))
                return {"choice": ci, "turn": j, "by": "token" if use_ids else "char", "index": k,
                        "spec": ta[j][:80] if use_ids else xa[max(0, k - 20):k + 40],
                        "baseline": tb[j][:80] if use_ids else xb[max(0, k - 20):k + 40]}
    return None


def _by_ids(a: dict, b: dict) -> bool:
    return all(isinstance(c.get("tokens"), list) for c in a["choices"] + b["choices"])


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
    by_ids = all(_by_ids(spec.records[k], base.records[k]) for k in keys)
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
        "agreement": (len(keys) - len(divergences)) / len(keys),
        "agreement_by": "token ids" if by_ids else "text",
        "n_identical": len(keys) - len(divergences),
        "divergences": divergences,
        "gsm8k_accuracy": gsm8k_accuracy(keys, spec, base, gsm8k_file, notes),
        "token_count": {"spec": dict(m_spec), "baseline": dict(m_base)},
        "meta": {"spec": spec.meta, "baseline": base.meta},
        "notes": notes,
    }


# ---- text --------------------------------------------------------------------------------------

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
