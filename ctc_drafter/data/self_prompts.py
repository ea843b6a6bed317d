"""Prompts without a dataset: the base model writes the user turns itself.

    chat template around a placeholder --the text before it-----------------> the user header (ids)
    header --the base samples, seed s (temperature, top-p), to its end of turn--> a user turn
    --filters: finished, length, mostly ASCII letters, no near-duplicate------> a question file

The question file holds distill's records, {"question_id", "turns": [text]}, plus each prompt's seed
and sampling settings; rejected samples go to <out>.rejected.jsonl with the reason. A rerun skips
every seed either file holds (a larger --count extends the file), rebuilds the near-duplicate index
from the kept prompts, and refuses other sampling settings. Sample s depends only on its seed, the
base and the settings (up to float rounding), not on the batch it was drawn in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoding.verify import check_sampling
from ..errors import CTCDrafterError
from .batch_generation import Sampling, generate_batch
from .near_duplicates import NearDuplicateIndex


PLACEHOLDER = "\u2063CTC-DRAFTER-USER-TURN\u2063"  # never in a template; marks where the user's text goes
# English function words (not "a": Spanish has it too): a prompt in English uses some
ENGLISH_WORDS = frozenset(
    "an the and or but if of to in on for with at by from as is are was be can could would should will do does "
    "i me my you your we our it this that these what how why which who when where please".split())


@dataclass
class PromptOptions:
    count: int = 1000  # seeds to sample: seed_start, ..., seed_start + count - 1
    seed_start: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256  # a user turn not finished within this is rejected
    batch_size: int = 32
    min_words: int = 3
    max_words: int = 400
    min_ascii: float = 0.9  # least share of the letters that are ASCII (a language heuristic)
    min_english: float = 0.05  # least share of the words that are English function words (at least one)
    dedup_threshold: float = 0.7  # character 5-gram Jaccard at which a prompt nearly duplicates a kept one

    def validate(self) -> None:
        if self.count < 1 or self.seed_start < 0:
            raise CTCDrafterError("--count must be at least 1 and --seed-start at least 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise CTCDrafterError("--max-new-tokens and --batch-size must be at least 1")
        check_sampling(self.temperature, 0, self.top_p, greedy=False)  # make-prompts always samples
        if not 0 < self.dedup_threshold <= 1 or not 0 <= self.min_ascii <= 1 or not 0 <= self.min_english <= 1:
            raise CTCDrafterError("--dedup-threshold must be in (0, 1], --min-ascii and --min-english in [0, 1]")
        if self.min_words > self.max_words:
            raise CTCDrafterError("--min-words must not exceed --max-words")

    def sampling_settings(self) -> dict:
        """What decides a seed's sample: a rerun must agree on it."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


# --------------------------------------------------------------------------- the user header


def user_header(tokenizer) -> tuple[list[int], set[int]]:
    """(ids that open a user turn, system prompt included; ids that may close it) in the tokenizer's
    chat template. The closing ids: the special token right after the user's text, if any."""
    if not getattr(tokenizer, "chat_template", None):
        raise CTCDrafterError("make-prompts needs a base whose tokenizer has a chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False,
                                         add_generation_prompt=False)
    before, found, after = text.partition(PLACEHOLDER)
    if not found:
        raise CTCDrafterError("the chat template does not show the user's text as given; cannot find its user header")
    header = tokenizer.encode(before, add_special_tokens=False)
    closing = tokenizer.encode(after, add_special_tokens=False)[:1]
    return header, {t for t in closing if t in set(tokenizer.all_special_ids)}


# --------------------------------------------------------------------------- filters


def rejection(text: str, ended: bool, opts: PromptOptions) -> str | None:
    """Why a sampled user turn is not kept (near-duplicates aside), or None."""
    if not ended:
        return "unfinished within --max-new-tokens"
    words = text.split()
    if len(words) < opts.min_words:
        return "shorter than --min-words"
    if len(words) > opts.max_words:
        return "longer than --max-words"
    letters = [c for c in text if c.isalpha()]
    if opts.min_ascii > 0 and (not letters or sum(c.isascii() for c in letters) < opts.min_ascii * len(letters)):
        return "not mostly ASCII letters"
    english = sum(w.strip(".,;:!?\"'()").lower() in ENGLISH_WORDS for w in words)
    if opts.min_english > 0 and english < max(1.0, opts.min_english * len(words)):
        return "too few English function words"
    return None


# --------------------------------------------------------------------------- files and resume


def rejected_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.jsonl")


# How every record this module writes begins (json.dumps of _verdicts' dicts): a kept one, a rejected one.
RECORD_STARTS = (b'{"question_id": "self-', b'{"seed": ')


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """(records, bytes that hold them) of a JSON-lines file this module wrote. Reads only: the file is
    refused untouched (CTCDrafterError) unless every complete line is one of its records; a last line
    without its newline is left out only if it begins as its records do (an append cut by a crash)."""
    if not path.is_file():
        return [], 0
    raw = path.read_bytes()
    complete = raw.rfind(b"\n") + 1
    cut = raw[complete:].lstrip()
    if cut and not any(r.startswith(cut) or cut.startswith(r) for r in RECORD_STARTS):
        raise CTCDrafterError(f"{path} is not a file make-prompts wrote; give a new --out")
    try:
        records = [json.loads(line) for line in raw[:complete].decode("utf-8").splitlines() if line.strip()]
    except ValueError as e:  # (UnicodeDecodeError is a ValueError)
        raise CTCDrafterError(f"{path} is not a file make-prompts wrote ({e}); give a new --out") from None
    if not all(isinstance(r, dict) and "seed" in r and "settings" in r for r in records):
        raise CTCDrafterError(f"{path} holds records make-prompts did not write; give a new --out")
    return records, complete


@dataclass
class Progress:
    kept: list[dict]  # records of the question file
    rejected: list[dict]
    lengths: dict  # path -> bytes of complete records (less than its size after an interrupted append)

    def seeds_done(self) -> set[int]:
        return {r["seed"] for r in self.kept + self.rejected}

    def drop_cut_lines(self) -> None:
        """Cut each file back to its complete records (the files are make-prompts' own: checked by reading)."""
        for path, n in self.lengths.items():
            if path.is_file() and path.stat().st_size > n:
                os.truncate(path, n)


def read_progress(out: Path, settings: dict | None = None) -> Progress:
    """What earlier runs wrote to `out` and its rejected file, read without writing; refuses files that
    make-prompts did not write and (given `settings`) records sampled with other settings."""
    if out.is_dir():
        raise CTCDrafterError(f"--out {out} is a folder; give a .jsonl file")
    (kept, n_out), (rejected, n_rej) = _read_lines(out), _read_lines(rejected_path(out))
    for r in kept + rejected if settings is not None else ():
        if r["settings"] != settings:
            raise CTCDrafterError(f"{out} was sampled with other settings ({r['settings']}); give another --out")
    return Progress(kept, rejected, {out: n_out, rejected_path(out): n_rej})


def _append(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- sampling


def sample_user_turns(base, header: list[int], closing: set[int], seeds: list[int],
                      opts: PromptOptions) -> list[tuple[str, bool]]:
    """(text, finished?) of the user turn the base writes after `header`, one per seed."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else min(closing | {0})
    replies = generate_batch(base, [header] * len(seeds), [opts.max_new_tokens] * len(seeds), pad,
                             closing | base.eos_token_ids, Sampling(opts.temperature, opts.top_p), gens)
    return [(base.tokenizer.decode(r.tokens, skip_special_tokens=True).strip(), r.ended) for r in replies]


def _verdicts(samples, seeds, opts: PromptOptions, index: NearDuplicateIndex, kept_seeds: list[int], meta: dict):
    """Split one batch's samples into kept and rejected records (kept ones join the index)."""
    kept, rejected = [], []
    for seed, (text, ended) in zip(seeds, samples):
        reason = rejection(text, ended, opts)
        if reason is None:
            dup = index.add(text)
            reason = None if dup is None else f"near-duplicate of seed {kept_seeds[dup]}"
        rec = {"seed": seed, **meta}
        if reason is None:
            kept_seeds.append(seed)
            kept.append({"question_id": f"self-{seed}", "turns": [text], **rec})
        else:
            rejected.append({**rec, "reason": reason, "text": text})
    return kept, rejected


def make_prompts(base, out: Path, opts: PromptOptions, progress: bool = True) -> dict:
    """Sample seeds seed_start .. seed_start + count - 1 not done yet into `out`; a summary of the file."""
    from tqdm.auto import tqdm

    opts.validate()
    if base.tokenizer is None:
        raise CTCDrafterError("make-prompts needs a base model with a tokenizer")
    out = Path(out)
    settings = {**opts.sampling_settings(), "dtype": str(base.dtype).removeprefix("torch.")}  # bf16 samples differ
    done = read_progress(out, settings)  # before any write: a file that is not its own is refused untouched
    header, closing = user_header(base.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    done.drop_cut_lines()
    out.touch()
    rejected_path(out).touch()
    index, kept_seeds = NearDuplicateIndex(opts.dedup_threshold), []
    for r in sorted(done.kept, key=lambda r: r["seed"]):
        index.add(r["turns"][0])
        kept_seeds.append(r["seed"])
    todo = [s for s in range(opts.seed_start, opts.seed_start + opts.count) if s not in done.seeds_done()]
    meta = {"source": "self-generated", "base": base.name, "settings": settings}
    counts = {"kept": len(done.kept), "rejected": len(done.rejected)}
    with tqdm(total=opts.count, initial=opts.count - len(todo), unit="seed", desc="make-prompts",
              disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(todo), opts.batch_size):
            seeds = todo[i : i + opts.batch_size]
            samples = sample_user_turns(base, header, closing, seeds, opts)
            kept, rejected = _verdicts(samples, seeds, opts, index, kept_seeds, meta)
            _append(out, kept)  # the question file first: a seed in it is done even if the next write is lost
            _append(rejected_path(out), rejected)
            counts["kept"] += len(kept)
            counts["rejected"] += len(rejected)
            bar.update(len(seeds))
            bar.set_postfix(kept=counts["kept"])
    return summarize(out)


def summarize(out: Path) -> dict:
    """Counts of a question file and its rejected file: kept, rejected by reason."""
    done = read_progress(out)
    kept, rejected = done.kept, done.rejected
    reasons: dict[str, int] = {}
    for r in rejected:
        key = "near-duplicate" if r["reason"].startswith("near-duplicate") else r["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    return {"out": str(out), "kept": len(kept), "rejected": len(rejected), "reasons": reasons}
