"""`corpus add` / `corpus build`: base-written conversations kept as compressed chunks, and the training
set rebuilt from them equal to what `distill` made; duplicates skipped; wrong bases, corrupt chunks,
benchmark questions and foreign folders refused in one line; inputs never modified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctc_drafter.cli.main import main
from ctc_drafter.data.corpus import read_corpus
from ctc_drafter.data.shards import plan_shards, read_manifest, read_shard

DATA = Path(__file__).resolve().parent / "data"
ARENA = DATA / "arena_question_head6.jsonl"
GSM8K = DATA / "gsm8k_train_head8.jsonl"
GSM8K_TEST = DATA / "gsm8k_test_head20.jsonl"
MT_BENCH = DATA / "mt_bench_question.jsonl"
F64 = ["--dtype", "float64", "--device", "cpu"]  # batched and unbatched passes agree exactly


def distill(model_dir, out, *data, extra=()):
    args = ["distill", "--base-model", str(model_dir), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--shard-size", "2", "--save-hidden", "--json", *F64,
            "--data", *map(str, data), *extra]
    assert main(args) == 0
    return out


def add(model_dir, src, corpus, *extra):
    return main(["corpus", "add", str(src), "--corpus", str(corpus), "--base-model", str(model_dir), *map(str, extra)])


def build(model_dir, corpus, out, *extra):
    return main(["corpus", "build", "--corpus", str(corpus), "--out", str(out), "--base-model", str(model_dir),
                 "--shard-size", "2", "--json", *F64, *extra])


def sequences(folder):
    return [s for e in read_manifest(folder)["shards"] for s in read_shard(folder / e["file"])]


def snapshot(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctc-drafter: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, tmp_path_factory):
    """The base's own answers to 6 arena prompts (3 shards, with hidden states)."""
    return distill(tiny_model_dir, tmp_path_factory.mktemp("d") / "arena", ARENA)


def test_add_then_build_equals_distill(tiny_model_dir, distilled, tmp_path, capsys):
    before = snapshot(distilled)
    assert add(tiny_model_dir, distilled, tmp_path / "corpus") == 0
    (chunk,) = read_corpus(tmp_path / "corpus")
    m = chunk.manifest
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["chunk_00000.json", "chunk_00000.npz"]
    assert chunk.ids.dtype == np.uint16  # SmolLM2's vocabulary fits 16 bits
    src = sequences(distilled)
    assert m["counts"]["conversations"] == len(src) == 6
    assert m["counts"]["tokens"] == sum(len(s.input_ids) for s in src)
    assert m["counts"]["trainable_positions"] == sum(int(s.loss_mask.sum()) for s in src)
    assert m["base"]["weights_sha256"] and m["dtype"] == "float64" and m["generation"]["max_new_tokens"] == 6
    assert m["sources"][0]["file"] == ARENA.name and m["sources"][0]["sha256"]
    assert m["generator"]["software"]["ctc_drafter"]  # distill recorded what wrote the data

    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "built", "--save-hidden") == 0
    out = sequences(tmp_path / "built")
    assert len(out) == len(src)
    for a, b in zip(src, out):  # labels by teacher forcing == the targets distill read off generating
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.targets, b.targets)
        torch.testing.assert_close(a.hidden.double(), b.hidden.double(), atol=2e-3, rtol=2e-3)
    bm = read_manifest(tmp_path / "built")
    assert bm["complete"] and bm["stats"]["agreement"] == 1.0  # greedy replies: the base's own tokens
    assert bm["base"] == read_manifest(distilled)["base"]  # what `train` checks
    assert plan_shards(tmp_path / "built", bm).problem(tmp_path / "built") is None
    from ctc_drafter.models.base import load_base_model
    from ctc_drafter.training.data import load_sequences

    train_seqs, _ = load_sequences([str(tmp_path / "built")], load_base_model(str(tiny_model_dir), device="cpu"),
                                   label_len=4, max_len=512)  # what `train --data` reads
    assert len(train_seqs) == len(src)
    assert snapshot(distilled) == before  # the input is only read

    built = snapshot(tmp_path / "built")
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "built", "--save-hidden") == 0  # resumes: done
    assert snapshot(tmp_path / "built") == built


def test_duplicates_are_skipped(tiny_model_dir, distilled, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert add(tiny_model_dir, distilled, corpus) == 0
    first = snapshot(corpus)
    assert add(tiny_model_dir, distilled, corpus) == 0  # everything known: no chunk
    assert "nothing added (6 of 6 already in the corpus)" in capsys.readouterr().err
    assert snapshot(corpus) == first

    more = distill(tiny_model_dir, tmp_path / "more", ARENA, GSM8K, extra=["--limit", "8"])  # 6 known + 2 new
    assert add(tiny_model_dir, more, corpus) == 0
    c0, c1 = read_corpus(corpus)
    assert c1.manifest["counts"]["conversations"] == 2 and c1.manifest["counts"]["duplicates_skipped"] == 6
    assert not set(c0.hashes()) & set(c1.hashes())

    twice = tmp_path / "twice.jsonl"  # the same prompt twice in one folder: greedy, so the same conversation
    lines = ARENA.read_text().splitlines()
    recs = [{**json.loads(lines[i]), "seed": seed, "settings": {"temperature": 1.0}}  # as make-prompts writes them
            for i, seed in ((0, 3), (0, 4), (1, 7))]
    twice.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert add(tiny_model_dir, distill(tiny_model_dir, tmp_path / "t", twice), tmp_path / "c2") == 0
    m = read_corpus(tmp_path / "c2")[0].manifest
    assert m["counts"]["conversations"] == 2 and m["counts"]["duplicates_skipped"] == 1
    assert m["sources"][0]["prompt_seeds"] == {"first": 3, "last": 7, "kept": 3}
    assert m["sources"][0]["prompt_settings"] == {"temperature": 1.0}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, smol_tokenizer, tiny_model_dir):
    """Another tiny model in a folder of the same name: only the weights tell them apart."""
    from transformers import LlamaForCausalLM

    from ctc_drafter.models.base import load_base_model

    cfg = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32").model.config
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("other") / Path(tiny_model_dir).name
    LlamaForCausalLM(cfg).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_a_base_other_than_the_writer_is_refused(tiny_model_dir, other_base, distilled, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert add(tiny_model_dir, distilled, corpus) == 0
    capsys.readouterr()
    assert build(other_base, corpus, tmp_path / "b") == 2
    assert "weights sha256" in one_error_line(capsys)
    assert not (tmp_path / "b").exists()
    assert add(other_base, distilled, corpus) == 2  # a chunk from another base into this corpus
    assert "weights sha256" in one_error_line(capsys)


def test_corrupt_chunk_is_one_clear_line(tiny_model_dir, distilled, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert add(tiny_model_dir, distilled, corpus) == 0
    npz, meta = corpus / "chunk_00000.npz", corpus / "chunk_00000.json"
    good = npz.read_bytes()
    capsys.readouterr()

    npz.write_bytes(good[:-40] + bytes(40))  # damaged bytes
    assert build(tiny_model_dir, corpus, tmp_path / "b") == 2
    assert "corrupt chunk" in one_error_line(capsys)

    npz.write_bytes(b"not a zip")  # damaged, and its manifest's sha256 made to match
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "sha256": hashlib.sha256(b"not a zip").hexdigest()}))
    assert build(tiny_model_dir, corpus, tmp_path / "b") == 2
    assert "corrupt chunk" in one_error_line(capsys)

    npz.write_bytes(good)
    meta.write_text(json.dumps({**m, "counts": {**m["counts"], "tokens": 1}}))  # counts that do not add up
    assert build(tiny_model_dir, corpus, tmp_path / "b") == 2
    assert "counts differ" in one_error_line(capsys)

    meta.write_text("{")
    assert build(tiny_model_dir, corpus, tmp_path / "b") == 2
    assert "corrupt" in one_error_line(capsys)

    npz.unlink()
    meta.write_text(json.dumps(m))
    assert build(tiny_model_dir, corpus, tmp_path / "b") == 2
    assert "is missing" in one_error_line(capsys)


def test_foreign_folders_benchmarks_and_budget_are_refused(tiny_model_dir, distilled, tmp_path, capsys):
    assert add(tiny_model_dir, distilled, tmp_path / "small", "--budget-mb", "0.0001") == 2
    assert "over its 0.0001 MB budget" in one_error_line(capsys)
    assert not list((tmp_path / "small").glob("chunk_*"))

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert add(tiny_model_dir, distilled, other) == 2  # --corpus that is not a corpus
    assert "not a corpus folder" in one_error_line(capsys)
    assert snapshot(other) == {"todo.txt": hashlib.sha256(b"x").hexdigest()}

    corpus = tmp_path / "corpus"
    assert add(tiny_model_dir, distilled, corpus) == 0
    capsys.readouterr()
    for out, msg in ((other, "holds other files"), (distilled, "not a corpus build")):  # --out that is not a build
        before = snapshot(out)
        assert build(tiny_model_dir, corpus, out) == 2
        assert msg in one_error_line(capsys)
        assert snapshot(out) == before

    mt = distill(tiny_model_dir, tmp_path / "mt", MT_BENCH, extra=["--limit", "2"])
    assert add(tiny_model_dir, mt, corpus, "--benchmark", GSM8K_TEST, "--benchmark", MT_BENCH) == 2
    assert f"questions of the benchmark file {MT_BENCH.name}" in one_error_line(capsys)
    assert len(read_corpus(corpus)) == 1
    assert add(tiny_model_dir, distill(tiny_model_dir, tmp_path / "g", GSM8K), corpus,
               "--benchmark", GSM8K_TEST, "--benchmark", MT_BENCH) == 0  # GSM8K *train*: fine
    excluded = read_corpus(corpus)[1].manifest["benchmarks_excluded"]
    assert [b["file"] for b in excluded] == [GSM8K_TEST.name, MT_BENCH.name]

    tf = tmp_path / "tf"
    assert main(["distill", "--base-model", str(tiny_model_dir), "--out", str(tf), "--mode", "teacher-forced",
                 "--data", str(GSM8K), "--limit", "2", "--json", *F64]) == 0
    capsys.readouterr()
    assert add(tiny_model_dir, tf, corpus) == 2  # the dataset's answers, not the base's
    assert "--mode regenerate" in one_error_line(capsys)


def test_build_limit_takes_the_first_conversations_and_extends(tiny_model_dir, distilled, tmp_path):
    assert add(tiny_model_dir, distilled, tmp_path / "corpus") == 0
    src = sequences(distilled)
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "built", "--limit", "3") == 0
    part = sequences(tmp_path / "built")
    assert [s.input_ids.tolist() for s in part] == [s.input_ids.tolist() for s in src[:3]]
    assert read_manifest(tmp_path / "built")["complete"]
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "built") == 0  # no limit: the rest is added
    whole = sequences(tmp_path / "built")
    assert [s.input_ids.tolist() for s in whole] == [s.input_ids.tolist() for s in src]
    assert all(torch.equal(a.targets, b.targets) for a, b in zip(src, whole))


def test_build_with_workers_makes_the_same_shards_and_resumes(tiny_model_dir, distilled, tmp_path, monkeypatch):
    """`corpus build --workers 2`: the shards dealt to two processes equal one process's, and a shard
    lost (as if its worker was killed) is the only one made again."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers inherit it
    assert add(tiny_model_dir, distilled, tmp_path / "corpus") == 0
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "one", "--save-hidden") == 0
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "two", "--save-hidden", "--workers", "2") == 0

    def same(a, b):
        sa, sb = sequences(a), sequences(b)
        assert len(sa) == len(sb) == 6
        for x, y in zip(sa, sb):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
            assert torch.equal(x.loss_mask, y.loss_mask) and torch.equal(x.hidden, y.hidden)

    same(tmp_path / "one", tmp_path / "two")
    shards = read_manifest(tmp_path / "two")["shards"]
    assert [json.loads((tmp_path / "two" / f"shard_{i:05d}.json").read_text())["worker"] for i in range(3)] == [0, 1, 0]
    assert len(shards) == 3 and read_manifest(tmp_path / "two")["complete"]
    (tmp_path / "two" / "shard_00001.json").unlink()
    kept = {n: (tmp_path / "two" / n).stat().st_mtime_ns for n in ("shard_00000.safetensors", "shard_00002.safetensors")}
    assert build(tiny_model_dir, tmp_path / "corpus", tmp_path / "two", "--save-hidden", "--workers", "2") == 0
    assert {n: (tmp_path / "two" / n).stat().st_mtime_ns for n in kept} == kept
    same(tmp_path / "one", tmp_path / "two")
