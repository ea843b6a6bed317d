"""The corpus: conversations the base wrote, kept as compressed token ids in chunks committed to the
repository, so that the training set survives the machine that made it (`corpus build` remakes it).

    corpus/chunk_00000.npz    ids      uint16 [N] (uint32 for vocabularies over 65536): every
                                       conversation's tokens (prompt turns + the base's replies), one
                                       after another, exactly as `distill` stored them
                              lengths  uint32 [S]: conversation s is the next lengths[s] ids
                              runs     uint32 [R, 2]: [start, end) in ids of each run of trainable
                                       positions (loss_mask 1: the next token is the base's): the turns
    corpus/chunk_00000.json   what the chunk is: the base (name, sizes, weights fingerprint), dtype,
                              generation settings, prompt sources with their sha256 and seeds, the
                              generator's software, counts, the benchmark files checked, the npz's sha256

The npz's entries are LZMA-compressed zip members (np.load reads them as any npz): on chat token ids
that is ~17 % smaller than np.savez_compressed's deflate. No targets and no hidden states: the base
recomputes both by teacher forcing. A chunk exists once its .json does (written after the .npz).
A conversation is known by the sha256 of its ids; `add` skips every conversation a chunk already holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CTCDrafterError, read_json_object, write_json_atomic, writing
from .distill_folder import software_versions
from .distill_plan import file_sha256

FORMAT = 1  # chunk format
CHUNK_RE = re.compile(r"chunk_(\d{5})\.(npz|json)")
OTHER_FILES = {"README.md", ".gitattributes"}  # a corpus folder may also hold these
ARRAYS = ("ids", "lengths", "runs")
BUDGET_MB = 50.0  # the corpus's size limit in the repository, all chunks together
MIN_QUESTION_CHARS = 20  # shorter benchmark turns ("Continue.") would match ordinary text


def chunk_stem(i: int) -> str:
    return f"chunk_{i:05d}"


# --------------------------------------------------------------------------- the base's identity


def _safetensors_digest(path: Path, h) -> None:
    """Feed the tensors of one safetensors file to `h` (name, dtype, shape, bytes), not the file's
    bytes: the header's order and metadata differ between writers of the same weights."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        start = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            a, b = t["data_offsets"]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode())
            f.seek(start + a)
            left = b - a
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise CTCDrafterError(f"{path} is truncated")
                h.update(block)
                left -= len(block)


def weights_fingerprint(name_or_path: str) -> str:
    """sha256 of a base's weights, as stored: its safetensors tensors (name, dtype, shape, bytes), else
    its .gguf / .bin / .pt files. The same weights in another file format give another fingerprint."""
    from ..models.base import locate_model

    path, gguf, _ = locate_model(name_or_path)
    h = hashlib.sha256()
    tensors = sorted(path.glob("*.safetensors")) if gguf is None else []
    if tensors:
        for p in tensors:
            _safetensors_digest(p, h)
        return h.hexdigest()
    files = [path / gguf] if gguf else sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if not files:
        raise CTCDrafterError(f"no weight files (.safetensors, .gguf, .bin) found for base model {name_or_path}")
    for p in files:
        h.update(bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


def describe_weights(name_or_path: str) -> dict:
    """The base as a chunk records it: name, sizes (from its config alone) and weights fingerprint."""
    from .worker_pool import BaseSpec, describe_base

    sig, _, _ = describe_base(BaseSpec(name_or_path, "cpu"), torch.device("cpu"))
    return {**sig, "weights_sha256": weights_fingerprint(name_or_path)}


def check_same_base(recorded: dict, given: dict, where: str, given_name: str) -> None:
    """Refuse a base whose weights are not those that wrote the corpus."""
    if recorded.get("weights_sha256") != given["weights_sha256"]:
        raise CTCDrafterError(
            f"{where} was written by {recorded.get('base_model')} (weights sha256 "
            f"{str(recorded.get('weights_sha256'))[:12]}...), but --base-model {given_name} is "
            f"{given['base_model']} (weights sha256 {given['weights_sha256'][:12]}...); give the base that wrote it")


# --------------------------------------------------------------------------- one chunk


@dataclass
class Chunk:
    name: str  # "chunk_00000"
    manifest: dict
    ids: np.ndarray  # [N]
    lengths: np.ndarray  # [S]
    runs: np.ndarray  # [R, 2]

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def loss_mask(self) -> np.ndarray:
        """[N] bool, rebuilt from the runs."""
        mask = np.zeros(len(self.ids), dtype=bool)
        for a, b in self.runs.tolist():
            mask[a:b] = True
        return mask

    def sequences(self) -> list[tuple[list[int], list[bool]]]:
        """(ids, loss_mask) of every conversation, in order."""
        off, mask = self.offsets().tolist(), self.loss_mask()
        ids = self.ids.astype(np.int64)
        return [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]

    def hashes(self) -> list[bytes]:
        off = self.offsets().tolist()
        return [conversation_hash(self.ids[a:b]) for a, b in zip(off[:-1], off[1:])]


def conversation_hash(ids) -> bytes:
    """A conversation's identity: sha256 of its ids (as uint32, whatever array type holds them)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.uint32).tobytes()).digest()


def encode_sequences(seqs: list[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> dict[str, np.ndarray]:
    """[(ids [T], loss_mask [T])] -> the chunk's arrays."""
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in seqs])
    mask = np.concatenate([np.asarray(m, dtype=bool) for _, m in seqs])
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    runs = np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1)
    return {"ids": ids.astype(np.uint16 if vocab_size <= 1 << 16 else np.uint32),
            "lengths": np.array([len(i) for i, _ in seqs], dtype=np.uint32),
            "runs": runs.astype(np.uint32).reshape(-1, 2)}


def npz_lzma_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz whose members are LZMA-compressed (np.load reads it like any npz)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ARRAYS if k not in z.files]
            if missing:
                raise ValueError(f"no '{missing[0]}' array")
            return {k: z[k] for k in ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CTCDrafterError(f"corrupt chunk {path}: {str(e).strip() or type(e).__name__}; "
                              f"restore it (git checkout -- {path.parent})") from e


def _check_arrays(path: Path, a: dict[str, np.ndarray], m: dict) -> None:
    """The arrays hang together and match the chunk's counts."""
    ids, lengths, runs = a["ids"], a["lengths"], a["runs"]
    counts = m.get("counts", {})
    problems = []
    if ids.ndim != 1 or lengths.ndim != 1 or runs.ndim != 2 or runs.shape[1:] != (2,):
        problems.append("arrays of the wrong shape")
    elif int(lengths.sum(dtype=np.int64)) != len(ids):
        problems.append(f"lengths add up to {int(lengths.sum(dtype=np.int64))}, not the {len(ids)} ids")
    elif len(runs) and (np.any(runs[:, 0] >= runs[:, 1]) or np.any(runs[1:, 0] < runs[:-1, 1])
                        or int(runs[-1, 1]) > len(ids)):
        problems.append("trainable runs out of order or out of range")
    elif len(ids) and int(ids.max()) >= m["base"]["vocab_size"]:
        problems.append(f"token id {int(ids.max())} outside the vocabulary ({m['base']['vocab_size']})")
    elif (counts.get("conversations"), counts.get("tokens"), counts.get("trainable_positions")) != \
            (len(lengths), len(ids), int((runs[:, 1].astype(np.int64) - runs[:, 0]).sum())):
        problems.append("its counts differ from its .json")
    if problems:
        raise CTCDrafterError(f"corrupt chunk {path}: {problems[0]}; restore it (git checkout -- {path.parent})")


def read_chunk(corpus_dir: Path, stem: str) -> Chunk:
    """One chunk, checked: its .json, the npz's sha256 against it, and the arrays' consistency."""
    corpus_dir = Path(corpus_dir)
    meta = corpus_dir / f"{stem}.json"
    m = read_json_object(meta, "chunk manifest")
    if m.get("format") != FORMAT or not isinstance(m.get("base"), dict) or "vocab_size" not in m["base"]:
        raise CTCDrafterError(f"corrupt chunk {meta}: not a format-{FORMAT} chunk manifest; "
                              f"restore it (git checkout -- {corpus_dir})")
    npz = corpus_dir / f"{stem}.npz"
    if not npz.is_file():
        raise CTCDrafterError(f"chunk {npz} is missing (its {meta.name} is there); "
                              f"restore it (git checkout -- {corpus_dir})")
    if file_sha256(npz) != m.get("sha256"):
        raise CTCDrafterError(f"corrupt chunk {npz}: its sha256 differs from the one in {meta.name}; "
                              f"restore it (git checkout -- {corpus_dir})")
    a = _load_arrays(npz)
    _check_arrays(npz, a, m)
    return Chunk(stem, m, a["ids"], a["lengths"], a["runs"])


# --------------------------------------------------------------------------- the corpus folder


def chunk_stems(corpus_dir: Path) -> list[str]:
    """The chunks of a corpus folder (those with a .json), in order; refuses a folder holding other files."""
    corpus_dir = Path(corpus_dir)
    if corpus_dir.exists() and not corpus_dir.is_dir():
        raise CTCDrafterError(f"--corpus {corpus_dir} is a file, not a folder")
    if not corpus_dir.is_dir():
        return []
    foreign = sorted(p.name for p in corpus_dir.iterdir()
                     if not CHUNK_RE.fullmatch(p.name) and p.name not in OTHER_FILES and not p.name.endswith(".tmp"))
    if foreign:
        raise CTCDrafterError(f"--corpus {corpus_dir} is not a corpus folder (it holds {foreign[0]}); "
                              f"give a corpus folder or a new one")
    return sorted(p.stem for p in corpus_dir.glob("chunk_*.json") if CHUNK_RE.fullmatch(p.name))


def read_corpus(corpus_dir: Path) -> list[Chunk]:
    return [read_chunk(corpus_dir, s) for s in chunk_stems(corpus_dir)]


def corpus_base(chunks: list[Chunk]) -> dict | None:
    """The base every chunk was written by; refuses a corpus mixing bases."""
    bases = {json.dumps(c.manifest["base"], sort_keys=True): c.name for c in chunks}
    if len(bases) > 1:
        raise CTCDrafterError(f"the corpus mixes bases ({', '.join(bases.values())} differ); one corpus per base")
    return chunks[0].manifest["base"] if chunks else None


# --------------------------------------------------------------------------- benchmark questions


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def benchmark_questions(paths: list[Path]) -> list[tuple[dict, list[str]]]:
    """Per benchmark file: ({"file", "sha256", "questions"}, its user turns normalised)."""
    from .conversations import Conversation, iter_records

    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CTCDrafterError(f"benchmark question file not found: {p}")
        turns = [_normal(u) for r in iter_records([p]) if isinstance(r, Conversation) for u in r.users]
        turns = sorted({t for t in turns if len(t) >= MIN_QUESTION_CHARS})
        if not turns:
            raise CTCDrafterError(f"no questions in benchmark file {p}")
        out.append(({"file": p.name, "sha256": file_sha256(p), "questions": len(turns)}, turns))
    return out


def benchmark_hit(texts: list[str], benchmarks: list[tuple[dict, list[str]]]) -> tuple[str, int, str] | None:
    """(benchmark file, conversations containing one of its questions, an example) or None."""
    normal = [_normal(t) for t in texts]
    for info, questions in benchmarks:
        hits = [next((q for q in questions if q in t), None) for t in normal]
        found = [q for q in hits if q is not None]
        if found:
            return info["file"], len(found), found[0]
    return None


# --------------------------------------------------------------------------- adding a distilled folder


def describe_source(entry: dict) -> dict:
    """A distill input as a chunk records it: file name, sha256, records, and, when the file is still
    where distill read it (same sha256) and was written by make-prompts, its seeds and settings."""
    out = {"file": Path(entry.get("path", "?")).name, "sha256": entry.get("sha256"), "records": entry.get("records")}
    p = Path(entry.get("path", ""))
    if not p.is_file() or file_sha256(p) != entry.get("sha256"):
        return out
    seeds, settings = [], None
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("seed"), int):
                seeds.append(r["seed"])
                settings = settings or r.get("settings")
    if seeds:
        out.update({"prompts_by": "ctc-drafter make-prompts", "prompt_settings": settings,
                    "prompt_seeds": {"first": min(seeds), "last": max(seeds), "kept": len(set(seeds))}})
    return out


def read_distilled(distill_dir: Path) -> tuple[dict, list]:
    """A finished `distill --mode regenerate` folder: (manifest, its Sequences in order)."""
    from .shards import plan_shards, read_manifest, read_shard

    distill_dir = Path(distill_dir)
    if not distill_dir.is_dir():
        raise CTCDrafterError(f"{distill_dir} is not a folder (give a `ctc-drafter distill --out` folder)")
    m = read_manifest(distill_dir)
    if m.get("mode") != "regenerate":
        raise CTCDrafterError(f"{distill_dir} was not written by the base (mode {m.get('mode')!r}, producer "
                              f"{m.get('producer')!r}); the corpus holds `distill --mode regenerate` conversations")
    problem = plan_shards(distill_dir, m).problem(distill_dir)
    if problem:
        raise CTCDrafterError(f"{problem}; finish it with the same `ctc-drafter distill` command first")
    seqs = [s for e in m.get("shards", []) for s in read_shard(distill_dir / e["file"])]
    return m, seqs


def chunk_manifest(dm: dict, base: dict, sources: list[dict], counts: dict, benchmarks: list[dict]) -> dict:
    opts = dm.get("options", {})
    return {
        "format": FORMAT,
        "producer": "ctc-drafter corpus add",
        "base": base,
        "dtype": dm.get("dtype"),
        "template": opts.get("template"),
        "generation": {k: opts.get(k) for k in ("max_len", "max_new_tokens", "temperature", "top_p", "seed")},
        "generator": {"engine": f"{dm.get('producer', 'ctc-drafter distill')} (data/batch_generation.py)",
                      "software": dm.get("software") or {"recorded_at_add": software_versions()}},
        "sources": sources,
        "benchmarks_excluded": benchmarks,
        "counts": counts,
    }


def add_chunk(distill_dir: Path, corpus_dir: Path, base_model: str = "default",
              benchmark_files: list[Path] = (), budget_mb: float = BUDGET_MB,
              tokenizer=None) -> tuple[dict | None, dict]:
    """Export a distilled folder's new conversations as the corpus's next chunk.

    Returns (the chunk's manifest, or None when every conversation is already in the corpus;
    {"conversations", "duplicates"}). The distilled folder is only read.
    """
    corpus_dir = Path(corpus_dir)
    stems = chunk_stems(corpus_dir)  # refuses a folder that is not a corpus before any work
    benchmarks = benchmark_questions(benchmark_files)
    dm, seqs = read_distilled(distill_dir)
    base = describe_weights(base_model)
    sig = dm.get("base", {})
    if any(sig.get(k) != base[k] for k in ("base_model", "hidden_size", "vocab_size")):
        raise CTCDrafterError(f"{distill_dir} was distilled from {sig.get('base_model')} "
                              f"(hidden {sig.get('hidden_size')}, vocab {sig.get('vocab_size')}), not from --base-model {base_model} "
                              f"({base['base_model']}); give the base that wrote it")
    chunks = [read_chunk(corpus_dir, s) for s in stems]
    known = corpus_base(chunks)
    if known is not None:
        check_same_base(known, base, str(corpus_dir), base_model)
    seen = {h for c in chunks for h in c.hashes()}
    new = []
    for s in seqs:
        h = conversation_hash(s.input_ids.numpy())
        if h not in seen:
            seen.add(h)
            new.append((s.input_ids, s.loss_mask))
    tally = {"conversations": len(seqs), "duplicates": len(seqs) - len(new)}
    if benchmarks and new:
        tok = tokenizer or _tokenizer(base_model)
        hit = benchmark_hit([tok.decode(i.tolist(), skip_special_tokens=True) for i, _ in new], benchmarks)
        if hit:
            raise CTCDrafterError(f"{distill_dir}: {hit[1]} conversation(s) contain questions of the benchmark file "
                                  f"{hit[0]} (e.g. {hit[2][:60]!r}); the corpus never holds benchmark questions")
    if not new:
        return None, tally
    arrays = encode_sequences(new, base["vocab_size"])
    data = npz_lzma_bytes(arrays)
    held = sum(c.manifest["counts"]["bytes"] for c in chunks)
    if held + len(data) > budget_mb * 1e6:
        raise CTCDrafterError(f"the chunk ({len(data) / 1e6:.1f} MB) would take {corpus_dir} to "
                              f"{(held + len(data)) / 1e6:.1f} MB, over its {budget_mb:g} MB budget (--budget-mb)")
    stem = chunk_stem(int(stems[-1][6:]) + 1 if stems else 0)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    npz = corpus_dir / f"{stem}.npz"
    with writing(npz, "chunk"):
        write_atomic(npz, data)
    counts = {"conversations": len(new), "tokens": int(len(arrays["ids"])),
              "trainable_positions": int((arrays["runs"][:, 1].astype(np.int64) - arrays["runs"][:, 0]).sum()),
              "duplicates_skipped": tally["duplicates"], "bytes": len(data)}
    counts["bytes_per_million_trainable_positions"] = round(len(data) * 1e6 / max(counts["trainable_positions"], 1))
    m = {**chunk_manifest(dm, base, [describe_source(e) for e in dm.get("inputs", [])], counts,
                          [info for info, _ in benchmarks]),
         "file": npz.name, "sha256": hashlib.sha256(data).hexdigest()}
    with writing(corpus_dir / f"{stem}.json", "chunk manifest"):
        write_json_atomic(corpus_dir / f"{stem}.json", m, indent=1)
    return m, tally


def _tokenizer(base_model: str):
    from transformers import AutoTokenizer

    from ..models.base import locate_model

    path, gguf, _ = locate_model(base_model)
    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def corpus_summary(chunks: list[Chunk]) -> dict:
    """Totals over the chunks: conversations, tokens, trainable positions, bytes."""
    tot = {k: sum(c.manifest["counts"][k] for c in chunks)
           for k in ("conversations", "tokens", "trainable_positions", "bytes")}
    tot["chunks"] = len(chunks)
    return tot

