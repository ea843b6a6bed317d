"""`distill`: chat data -> shards whose targets are the base's own greedy tokens; resumable; clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctc_drafter.cli.main import main
from ctc_drafter.data import distill as D
from ctc_drafter.data import distill_folder, labelling, worker_pool
from ctc_drafter.data.conversations import iter_conversations
from ctc_drafter.data.shards import check_manifest_matches, read_manifest, read_shard
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import load_base_model
from ctc_drafter.models.templates import build_prompt_ids


DATA = Path(__file__).resolve().parent / "data"  # small excerpts of the shared data sets: the suite needs no ../shared
GSM8K = DATA / "gsm8k_train_head8.jsonl"
MT_BENCH = DATA / "mt_bench_question.jsonl"
SHAREGPT = DATA / "sharegpt_sample_head12.json"
ARENA = DATA / "arena_question_head6.jsonl"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """float64, so batched / cached / chunked passes agree exactly with the reference ones. The tiny
    model's head is untied, so its greedy text varies (a tied one repeats one token forever)."""
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float64")


def reference_argmax(base, ids) -> torch.Tensor:
    """Greedy next token at every position: one plain unbatched forward."""
    with torch.no_grad():
        return base.model(torch.tensor([list(ids)])).logits[0].argmax(-1)


def reference_greedy(base, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache, no batch, no padding)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_argmax(base, ids)[-1]))
        if ids[-1] in base.eos_token_ids:
            break
    return ids[len(prompt):]


def all_sequences(out):
    m = read_manifest(out)
    return [s for sh in m["shards"] for s in read_shard(out / sh["file"])]


def assert_same_shards(a, b):
    """Two data folders hold the same shard files with equal tensors, and the same manifest counts."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("shard_*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("shard_*.safetensors"))
    for n in names:
        x, y = load_file(str(a / n)), load_file(str(b / n))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), n
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["complete"] and mb["complete"]
    assert ma["shards"] == mb["shards"] and ma["stats"] == mb["stats"]


def opts(**kw):
    kw = {"max_new_tokens": 6, "batch_size": 2, "shard_size": 2, **kw}
    return D.DistillOptions(**kw)


# --------------------------------------------------------------------------- reading data


def test_every_record_format_becomes_a_conversation(tmp_path):
    recs = [
        {"id": "sg", "conversations": [{"from": "gpt", "value": "greeting dropped"}, {"from": "system", "value": "s"},
                                       {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                       {"from": "human", "value": "q2"}, {"from": "human", "value": "broken"},
                                       {"from": "gpt", "value": "never reached"}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "r"}]},
        {"question_id": 7, "turns": ["t1", "t2"]},
        {"question": "q", "answer": "a"},
        {"instruction": "do", "input": "this", "output": "done"},
        {"prompt": "p", "completion": "c"},
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    convs = list(iter_conversations([f]))
    assert [(c.id, c.users, c.replies) for c in convs] == [
        ("sg", ["q1", "q2"], ["a1"]),
        ("mixed.jsonl:1", ["u"], ["r"]),
        ("7", ["t1", "t2"], None),
        ("mixed.jsonl:3", ["q"], ["a"]),
        ("mixed.jsonl:4", ["do\n\nthis"], ["done"]),
        ("mixed.jsonl:5", ["p"], ["c"]),
    ]
    h = tmp_path / "sep.jsonl"  # U+2028 inside a JSON string is not a line break in JSON Lines
    h.write_text(json.dumps({"question": "a\u2028b", "answer": "c"}, ensure_ascii=False) + "\n")
    assert [c.users for c in iter_conversations([h])] == [["a\u2028b"]]
    g = tmp_path / "list.json"
    g.write_text(json.dumps(recs[:2], indent=2))  # a multi-line JSON list
    assert len(list(iter_conversations([g]))) == 2


def test_shared_data_files_read():
    sg = list(iter_conversations([SHAREGPT]))
    assert len(sg) == 12 and all(c.users and len(c.replies) == len(c.users) for c in sg)
    mt = list(iter_conversations([MT_BENCH]))
    assert len(mt) == 16 and all(len(c.users) == 2 and c.replies is None for c in mt)


@pytest.mark.parametrize("text, msg", [
    ('{"text": "no known fields"}\n{"also": 1}\n', "unknown data format"),
    ('[1, 2]', "not a JSON object"),
    ('[{"question": "q"', "not valid JSON"),
])
def test_unusable_file_is_a_one_line_error(tmp_path, text, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(CTCDrafterError, match=msg):
        list(iter_conversations([f]))


def test_malformed_records_are_counted_and_skipped(base, tmp_path):
    good = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3]]
    lines = [json.dumps(good[0]), "{oops", json.dumps({"question": 5}), json.dumps(good[1]),
             json.dumps({"question": "   "}), json.dumps({"turns": ["no answer here"]}), json.dumps(good[2])]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    m = D.distill(base, [f], tmp_path / "o", opts(mode="teacher-forced", shard_size=3), progress=False)
    assert m["malformed"]["count"] == 3 and m["stats"]["malformed"] == 3
    reasons = m["malformed"]["examples"]
    assert "line 2 is not valid JSON" in reasons[0] and "'question' is not text" in reasons[1]
    assert "empty user turn" in reasons[2]
    # the record without a dataset answer is skipped by teacher-forced mode, the rest distilled
    assert m["stats"]["skipped"] == {"no dataset answer": 1}
    assert m["stats"]["records"] == 7 and m["stats"]["sequences"] == 3
    texts = [base.tokenizer.decode(s.input_ids) for s in all_sequences(tmp_path / "o")]
    assert [g["question"] in t for g, t in zip(good, texts)] == [True] * 3


# --------------------------------------------------------------------------- labelling


def test_label_batch_equals_unbatched_forward(base, monkeypatch):
    monkeypatch.setattr(labelling, "LOGIT_ELEMS", 3 * base.config.vocab_size)  # LM head in chunks of 3 rows
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, base.config.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 1)]
    out = D.label_batch(base, seqs, save_hidden=True)
    for s, (targets, hidden) in zip(seqs, out):
        assert torch.equal(targets, reference_argmax(base, s))
        with torch.no_grad():
            ref_h = base.model.model(torch.tensor([s])).last_hidden_state[0]
        assert hidden.dtype == torch.float16 and hidden.shape == (len(s), base.config.hidden_size)
        torch.testing.assert_close(hidden.double(), ref_h, atol=2e-3, rtol=2e-3)


def test_data_mode_keeps_dataset_replies_and_labels_with_base(base, tmp_path):
    m = D.distill(base, [GSM8K], tmp_path / "d", opts(mode="teacher-forced", limit=3), progress=False)
    seqs = all_sequences(tmp_path / "d")
    answers = [c.replies[0] for c in list(iter_conversations([GSM8K]))[:3]]
    assert m["complete"] and len(seqs) == 3 and m["stats"]["sequences"] == 3
    for s, answer in zip(seqs, answers):
        assert torch.equal(s.targets, reference_argmax(base, s.input_ids))
        # the trained positions are exactly those followed by the answer (and the template's end tokens)
        nxt = s.input_ids[1:][s.loss_mask[:-1]]
        assert answer.strip() in base.tokenizer.decode(nxt)
        assert not s.loss_mask[-1]
    assert m["stats"]["assistant_tokens"] == sum(int(s.loss_mask.sum()) for s in seqs)
    check_manifest_matches(m, base)
    with pytest.raises(CTCDrafterError, match="distilled from"):
        check_manifest_matches({**m, "base": {**m["base"], "hidden_size": 99}}, base)


def test_base_mode_replies_are_the_base_greedy_continuations(base, tmp_path):
    m = D.distill(base, [MT_BENCH], tmp_path / "b", opts(limit=3), progress=False)
    seqs = all_sequences(tmp_path / "b")
    qs = list(iter_conversations([MT_BENCH]))[:3]
    assert len(seqs) == 3
    for s, q in zip(seqs, qs):
        # the base never ends a reply within 6 tokens here, so each conversation stops after its first turn
        prompt = build_prompt_ids(base.tokenizer, [{"role": "user", "content": q.users[0]}])
        reply = reference_greedy(base, prompt, 6)
        assert s.input_ids.tolist() == prompt + reply
        assert s.loss_mask.tolist() == [False] * (len(prompt) - 1) + [True] * len(reply) + [False]
    assert m["stats"]["agreement"] == 1.0  # data token == base greedy target at every trained position
    assert m["stats"]["replies_generated"] == 3 and m["stats"]["replies_unfinished"] == 3


def test_base_mode_answers_every_turn_seeing_its_own_replies(base, tmp_path, monkeypatch):
    q = list(iter_conversations([MT_BENCH]))[0]
    tok = base.tokenizer
    p1 = build_prompt_ids(tok, [{"role": "user", "content": q.users[0]}])
    first = reference_greedy(base, p1, 1)[0]
    # make the base's first greedy token an end token: turn 1 ends at once and turn 2 gets asked
    monkeypatch.setattr(base.model.generation_config, "eos_token_id", [tok.eos_token_id, first])
    m = D.distill(base, [MT_BENCH], tmp_path / "mt", opts(limit=1), progress=False)
    (s,) = all_sequences(tmp_path / "mt")
    reply1 = tok.decode([first])
    p2 = build_prompt_ids(tok, [{"role": "user", "content": q.users[0]}, {"role": "assistant", "content": reply1},
                                {"role": "user", "content": q.users[1]}])
    reply2 = reference_greedy(base, p2, 6)
    assert s.input_ids.tolist() == p2 + reply2
    text_trained = tok.decode(s.input_ids[1:][s.loss_mask[:-1]])
    assert reply1.strip() in text_trained and tok.decode(reply2) in text_trained
    assert q.users[1] not in text_trained  # user turns never train
    assert m["stats"]["replies_generated"] == 2


def test_save_hidden_stores_the_base_states(base, tmp_path):
    D.distill(base, [GSM8K], tmp_path / "h", opts(mode="teacher-forced", limit=2, save_hidden=True), progress=False)
    for s in all_sequences(tmp_path / "h"):
        with torch.no_grad():
            ref = base.model.model(s.input_ids[None]).last_hidden_state[0]
        assert s.hidden.shape == (len(s.input_ids), base.config.hidden_size)
        torch.testing.assert_close(s.hidden.double(), ref, atol=2e-3, rtol=2e-3)


def test_base_mode_reads_targets_and_states_off_generation(base, tmp_path):
    """Regenerated conversations get no second pass: targets and hidden states come from generating
    them, and equal one unbatched forward over the finished sequence (float64)."""
    D.distill(base, [MT_BENCH], tmp_path / "g", opts(limit=3, batch_size=3, save_hidden=True), progress=False)
    seqs = all_sequences(tmp_path / "g")
    assert len(seqs) == 3
    for s in seqs:
        assert torch.equal(s.targets, reference_argmax(base, s.input_ids.tolist()))
        with torch.no_grad():
            ref = base.model.model(s.input_ids[None]).last_hidden_state[0]
        torch.testing.assert_close(s.hidden.double(), ref, atol=2e-3, rtol=2e-3)


def test_max_length_cuts_and_skips(base, tmp_path):
    D.distill(base, [MT_BENCH], tmp_path / "c", opts(limit=2, max_len=64, max_new_tokens=100), progress=False)
    seqs = all_sequences(tmp_path / "c")
    assert seqs and all(len(s.input_ids) <= 64 for s in seqs)
    with pytest.raises(CTCDrafterError, match="no usable records"):
        D.distill(base, [MT_BENCH], tmp_path / "c2", opts(limit=2, max_len=8), progress=False)


# --------------------------------------------------------------------------- resume and the output folder


def test_sampled_replies_follow_the_seed(base, tmp_path):
    """--seed decides sampled replies: the same seed writes the same text, another seed other text (the
    generator keeps 32 bits of its seed; a seed mixed in above them once changed nothing)."""
    ids = {}
    for name, seed in (("a", 1), ("again", 1), ("b", 2)):
        D.distill(base, [SHAREGPT], tmp_path / name, opts(limit=4, temperature=1.0, seed=seed), progress=False)
        ids[name] = [x.input_ids.tolist() for x in all_sequences(tmp_path / name)]
    assert ids["a"] == ids["again"]
    assert sum(x != y for x, y in zip(ids["a"], ids["b"])) >= 3
    assert labelling.reply_seed(0, 7, 1) == (7 << 12) + 1  # seed 0 keeps the earlier stream


def test_interrupted_run_resumes_to_the_same_data(base, tmp_path, monkeypatch):
    o = opts(limit=5, temperature=1.0, seed=3)  # sampled replies: resuming must reproduce them too
    full = D.distill(base, [SHAREGPT], tmp_path / "full", o, progress=False)
    assert [s["first"] for s in full["shards"]] == [0, 2, 4]  # shard i = records [2i, 2i+2)

    written = []
    real_write = distill_folder.write_shard

    def write_then_crash(path, seqs):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(path, seqs)

    monkeypatch.setattr(distill_folder, "write_shard", write_then_crash)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        D.distill(base, [SHAREGPT], cut, o, progress=False)
    assert not read_manifest(cut)["complete"]
    plan = D.read_plan([SHAREGPT], o)
    assert D.pending_shards(cut, plan) == [1, 2]
    (cut / "shard_00001.safetensors.tmp").write_bytes(b"half-written")
    first_shard = (cut / "shard_00000.safetensors").stat().st_mtime_ns

    written.clear()
    monkeypatch.setattr(distill_folder, "write_shard", lambda path, seqs: (written.append(path.name), real_write(path, seqs)))
    resumed = D.distill(base, [SHAREGPT], cut, o, progress=False)
    assert written == ["shard_00001.safetensors", "shard_00002.safetensors"]  # only the unfinished ones
    assert (cut / "shard_00000.safetensors").stat().st_mtime_ns == first_shard
    assert resumed["shards"] == full["shards"] and resumed["stats"] == full["stats"]
    assert not list(cut.glob("*.tmp"))
    assert_same_shards(tmp_path / "full", cut)


def test_finished_folder_is_kept_other_settings_refused(base, tmp_path):
    out = tmp_path / "f"
    D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=2), progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=2, batch_size=1), progress=False)
    assert again["complete"] and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(CTCDrafterError, match="max_len 2048 -> 100"):
        D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=2, max_len=100), progress=False)
    m = D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=1), overwrite=True, progress=False)
    assert m["stats"]["sequences"] == 1 and len(list(out.glob("shard_*.safetensors"))) == len(m["shards"]) == 1
    assert sorted(p.name for p in out.glob("shard_*.json")) == ["shard_00000.json"]  # overwrite cleared the rest


def test_larger_limit_extends_a_finished_folder(base, tmp_path):
    out = tmp_path / "e"
    first = D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=3), progress=False)
    stamp = (out / "shard_00000.safetensors").stat().st_mtime_ns
    more = D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=4), progress=False)
    # shard 0 is kept; shard 1 held record 2 only and is remade as records 2-3
    assert more["shards"][0] == first["shards"][0] and (out / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    assert more["shards"][1]["records"] == 2 and more["stats"]["sequences"] == 4
    assert more["complete"] and more["records"] == 4
    D.distill(base, [GSM8K], tmp_path / "e4", opts(mode="teacher-forced", limit=4), progress=False)
    assert_same_shards(out, tmp_path / "e4")  # as if made in one go
    with pytest.raises(CTCDrafterError, match="asks for fewer"):
        D.distill(base, [GSM8K], out, opts(mode="teacher-forced", limit=1), progress=False)


def test_folder_with_other_files_is_refused(base, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CTCDrafterError, match="did not write"):
        D.distill(base, [GSM8K], tmp_path, opts(mode="teacher-forced", limit=1), overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").exists()


def test_data_mode_needs_replies(base, tmp_path):
    with pytest.raises(CTCDrafterError, match="--mode regenerate"):
        D.distill(base, [MT_BENCH], tmp_path / "x", opts(mode="teacher-forced", limit=1), progress=False)


# --------------------------------------------------------------------------- CLI


def cli(model_dir, out, *args) -> list[str]:
    return ["distill", "--base-model", str(model_dir), "--out", str(out), "--dtype", "float64", "--device", "cpu",
            *map(str, args)]


def test_cli_distills_and_reports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = cli(tiny_model_dir, out, "--data", GSM8K, "--limit", 2, "--mode", "teacher-forced", "--max-len", 100)
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sequences"] == 2 and res["complete"] and res["shards"] == len(read_manifest(out)["shards"])
    m = read_manifest(out)
    assert m["format"] == 1 and m["mode"] == "teacher-forced" and m["options"]["max_len"] == 100
    assert [len(s.input_ids) for s in all_sequences(out)] == [100, 100]  # cut
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "already complete" in cap.err and "2 sequences" in cap.out
    # the old spellings still work and mean the same, so the folder is still complete
    assert main([*cli(tiny_model_dir, out, "--data", GSM8K, "--limit", 2, "--responses", "data", "--max-length", 100)]) == 0
    assert "already complete" in capsys.readouterr().err


def test_cli_regenerate_over_several_files(tiny_model_dir, base, tmp_path, capsys):
    """--data repeated and with several files; the base answers (arena, sharegpt) questions itself."""
    few = tmp_path / "few.jsonl"  # two arena questions, then the ShareGPT sample: --limit 4 spans both
    few.write_text("\n".join(ARENA.read_text().splitlines()[:2]) + "\n")
    out = tmp_path / "regen"
    rc = main(cli(tiny_model_dir, out, "--data", few, "--data", SHAREGPT, GSM8K, "--limit", 4, "--shard-size", 3,
                  "--mode", "regenerate", "--max-new-tokens", 5, "--template", "auto", "--json"))
    assert rc == 0
    m = read_manifest(out)
    assert [Path(i["path"]).name for i in m["inputs"]] == ["few.jsonl", SHAREGPT.name, GSM8K.name]
    assert m["mode"] == "regenerate" and [s["records"] for s in m["shards"]] == [3, 1]
    seqs = all_sequences(out)
    assert len(seqs) == 4 and m["stats"]["replies_generated"] == 4
    for s in seqs:  # every trained token is the base's own greedy choice
        assert torch.equal(s.targets, reference_argmax(base, s.input_ids))
        assert torch.equal(s.input_ids[1:][s.loss_mask[:-1]], s.targets[:-1][s.loss_mask[:-1]])
    capsys.readouterr()


@pytest.mark.parametrize("extra, msg", [
    (["--data", "/nonexistent.jsonl"], "data file not found"),
    (["--data", str(MT_BENCH), "--mode", "teacher-forced"], "--mode regenerate"),
    (["--data", str(GSM8K), "--max-len", "1"], "argument --max-len/--max-length: 1 is out of range: must be >= 2"),
    (["--data", str(GSM8K), "--mode", "sideways"], "invalid choice 'sideways'"),
    (["--data", str(GSM8K), "--gpus", "0;1"], "CUDA is not available"),
    (["--data", str(GSM8K), "--gpus", "0;x"], "--gpus '0;x'"),
    (["--data", str(GSM8K), "--gpus", "0", "--workers", "2"], "not allowed with argument"),
    (["--data", str(GSM8K), "--workers", "0"], "argument --workers: 0 is out of range"),
])
def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, extra, msg):
    if "CUDA" in msg and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    try:
        rc = main(["distill", "--base-model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--limit", "1", *extra])
    except SystemExit as e:  # argparse's own errors (same format: one line, exit 2)
        rc = e.code
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ctc-drafter") and msg in lines[0], err


def test_cli_other_data_into_a_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(cli(tiny_model_dir, out, "--data", GSM8K, "--limit", 1, "--mode", "teacher-forced", "--json")) == 0
    capsys.readouterr()
    for other in (["--data", SHAREGPT], ["--data", GSM8K, "--dtype", "float32"], ["--data", GSM8K, "--shard-size", 5]):
        rc = main([*cli(tiny_model_dir, out, "--limit", 1, "--mode", "teacher-forced"), *map(str, other)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "other settings" in lines[0], lines


# --------------------------------------------------------------------------- several processes

PARALLEL = ["--data", SHAREGPT, "--limit", 5, "--shard-size", 2, "--max-new-tokens", 4, "--batch-size", 2]


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, tmp_path_factory):
    """The reference: the parallel runs below must write exactly these shards."""
    out = tmp_path_factory.mktemp("single") / "d"
    assert main([*cli(tiny_model_dir, out, *PARALLEL), "--json"]) == 0
    assert len(read_manifest(out)["shards"]) == 3
    return out


@pytest.mark.slow  # worker processes
def test_workers_make_the_same_shards_and_resume(tiny_model_dir, single_process_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers inherit it
    out = tmp_path / "w"
    assert main(cli(tiny_model_dir, out, *PARALLEL, "--workers", 2, "--json")) == 0
    assert_same_shards(single_process_run, out)
    assert made_by(out) == [0, 1, 0]  # shards dealt round-robin to the two workers
    # lose shard 1 (as if a worker was killed while making it): a rerun makes only that one again
    (out / "shard_00001.json").unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in ("shard_00000.safetensors", "shard_00002.safetensors")}
    assert main(cli(tiny_model_dir, out, *PARALLEL, "--workers", 2, "--json")) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert_same_shards(single_process_run, out)
    assert made_by(out)[1] == 0  # the one shard left to do went to the first worker
    capsys.readouterr()


def test_a_failing_worker_stops_the_run_with_one_line():
    import queue as queue_mod
    from types import SimpleNamespace

    def follow(messages, exitcodes):
        q = queue_mod.Queue()
        for m in messages:
            q.put(m)
        procs = [SimpleNamespace(exitcode=c) for c in exitcodes]
        seen = []
        worker_pool.follow_workers(procs, q, lambda r, t: seen.append((r, t)))
        return seen

    assert follow([("progress", 0, 2, 40), ("done", 0), ("progress", 1, 1, 9), ("done", 1)], [0, 0]) == [(2, 40), (1, 9)]
    with pytest.raises(CTCDrafterError, match="worker 1: out of memory"):
        follow([("progress", 0, 2, 40), ("error", 1, "out of memory")], [None, 1])
    with pytest.raises(CTCDrafterError, match=r"worker 1 stopped \(exit code -9\).*run the same command again"):
        follow([("done", 0)], [0, -9])  # killed without a word


def made_by(out) -> list[int]:
    """Which worker / launched process made each shard (from the shards' .json)."""
    return [json.loads(p.read_text())["worker"] for p in sorted(out.glob("shard_*.json"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # accelerate launch: two processes
def test_accelerate_launch_makes_the_same_shards(tiny_model_dir, single_process_run, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up; the torchrun
    # launcher (--multi_gpu) with --device cpu runs two real processes over gloo on a machine without GPUs
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "ctc_drafter", *cli(tiny_model_dir, out, *PARALLEL)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 sequences" in r.stdout and r.stdout.count("sequences") == 1  # only the main process reports
    assert_same_shards(single_process_run, out)
    assert made_by(out) == [0, 1, 0]  # process r made shards r, r+2, ...


