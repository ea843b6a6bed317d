"""`distill`: chat data -> shards whose targets are the base's own greedy tokens; resumable; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from ctc_drafter.cli.main import main
from ctc_drafter.data import distill as D
from ctc_drafter.data.conversations import iter_conversations
from ctc_drafter.data.shards import check_manifest_matches, read_manifest, read_shard
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import load_base_model
from ctc_drafter.models.templates import build_prompt_ids

from conftest import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
MT_BENCH = SHARED_DATA / "mt_bench" / "question.jsonl"
SHAREGPT = SHARED_DATA / "sharegpt_format_sample.json"


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, smol_tokenizer):
    """Tiny random Llama with SmolLM2's tokenizer and an untied head: its greedy text varies
    (a tied one repeats its last token, '\\n' after the assistant header, forever)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smol_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny-untied")
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base(untied_dir):
    """float64, so batched / cached / chunked passes agree exactly with the reference ones."""
    return load_base_model(str(untied_dir), device="cpu", dtype="float64")


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


def opts(**kw):
    kw = {"max_new_tokens": 6, "batch_size": 2, "group_size": 2, "shard_tokens": 1, **kw}
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
    g = tmp_path / "list.json"
    g.write_text(json.dumps(recs[:2], indent=2))  # a multi-line JSON list
    assert len(list(iter_conversations([g]))) == 2


def test_shared_data_files_read():
    sg = list(iter_conversations([SHAREGPT]))
    assert len(sg) == 500 and all(c.users and len(c.replies) == len(c.users) for c in sg)
    mt = list(iter_conversations([MT_BENCH]))
    assert len(mt) == 80 and all(len(c.users) == 2 and c.replies is None for c in mt)


@pytest.mark.parametrize("text, msg", [
    ('{"question": "q", "answer": "a"}\n{oops\n', "line 2"),
    ('{"text": "no known fields"}\n', "unrecognised format"),
    ('[1, 2]', "not a JSON object"),
])
def test_bad_data_is_a_one_line_error(tmp_path, text, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(CTCDrafterError, match=msg):
        list(iter_conversations([f]))


# --------------------------------------------------------------------------- labelling


def test_label_batch_equals_unbatched_forward(base, monkeypatch):
    monkeypatch.setattr(D, "LOGIT_ELEMS", 3 * base.config.vocab_size)  # LM head in chunks of 3 rows
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
    m = D.distill(base, [GSM8K], tmp_path / "d", opts(responses="data", limit=3), progress=False)
    seqs = all_sequences(tmp_path / "d")
    answers = [c.replies[0] for c in list(iter_conversations([GSM8K]))[:3]]
    assert m["complete"] and len(seqs) == 3 and m["stats"]["sequences"] == 3
    for s, answer in zip(seqs, answers):
        assert torch.equal(s.targets, reference_argmax(base, s.input_ids))
        # the trained positions are exactly those followed by the answer (and the template's end tokens)
        nxt = s.input_ids[1:][s.loss_mask[:-1]]
        assert answer.strip() in base.tokenizer.decode(nxt)
        assert not s.loss_mask[-1]
    assert m["stats"]["train_tokens"] == sum(int(s.loss_mask.sum()) for s in seqs)
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
    D.distill(base, [GSM8K], tmp_path / "h", opts(responses="data", limit=2, save_hidden=True), progress=False)
    for s in all_sequences(tmp_path / "h"):
        with torch.no_grad():
            ref = base.model.model(s.input_ids[None]).last_hidden_state[0]
        assert s.hidden.shape == (len(s.input_ids), base.config.hidden_size)
        torch.testing.assert_close(s.hidden.double(), ref, atol=2e-3, rtol=2e-3)


def test_max_length_cuts_and_skips(base, tmp_path):
    D.distill(base, [MT_BENCH], tmp_path / "c", opts(limit=2, max_length=64, max_new_tokens=100), progress=False)
    seqs = all_sequences(tmp_path / "c")
    assert seqs and all(len(s.input_ids) <= 64 for s in seqs)
    with pytest.raises(CTCDrafterError, match="no usable conversations"):
        D.distill(base, [MT_BENCH], tmp_path / "c2", opts(limit=2, max_length=8), progress=False)


# --------------------------------------------------------------------------- resume and the output folder


def test_interrupted_run_resumes_to_the_same_data(base, tmp_path, monkeypatch):
    o = opts(limit=5, temperature=1.0, seed=3)  # sampled replies: resuming must reproduce them too
    full = D.distill(base, [SHAREGPT], tmp_path / "full", o, progress=False)
    assert len(full["shards"]) == 3  # groups of 2 conversations, one shard each

    calls = {"n": 0}
    real_write = D.write_shard

    def write_then_crash(path, seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_write(path, seqs)

    monkeypatch.setattr(D, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        D.distill(base, [SHAREGPT], tmp_path / "cut", o, progress=False)
    half = read_manifest(tmp_path / "cut")
    assert not half["complete"] and len(half["shards"]) == 1 and half["cursor"] == 2
    (tmp_path / "cut" / "shard_00001.safetensors.tmp").write_bytes(b"half-written")
    monkeypatch.setattr(D, "write_shard", real_write)

    resumed = D.distill(base, [SHAREGPT], tmp_path / "cut", o, progress=False)
    assert resumed["shards"] == full["shards"] and resumed["stats"] == full["stats"]
    assert not list((tmp_path / "cut").glob("*.tmp"))
    for a, b in zip(all_sequences(tmp_path / "full"), all_sequences(tmp_path / "cut")):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.loss_mask, b.loss_mask)


def test_finished_folder_is_kept_other_settings_refused(base, tmp_path):
    out = tmp_path / "f"
    D.distill(base, [GSM8K], out, opts(responses="data", limit=2), progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = D.distill(base, [GSM8K], out, opts(responses="data", limit=2, batch_size=1), progress=False)
    assert again["complete"] and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(CTCDrafterError, match="max_length 2048 -> 100"):
        D.distill(base, [GSM8K], out, opts(responses="data", limit=2, max_length=100), progress=False)
    m = D.distill(base, [GSM8K], out, opts(responses="data", limit=1), overwrite=True, progress=False)
    assert m["stats"]["sequences"] == 1 and len(list(out.glob("shard_*"))) == len(m["shards"])


def test_larger_limit_extends_a_finished_folder(base, tmp_path):
    out = tmp_path / "e"
    first = D.distill(base, [GSM8K], out, opts(responses="data", limit=2), progress=False)
    more = D.distill(base, [GSM8K], out, opts(responses="data", limit=3), progress=False)
    assert more["shards"][: len(first["shards"])] == first["shards"] and more["stats"]["sequences"] == 3
    assert more["complete"] and more["cursor"] == 3
    with pytest.raises(CTCDrafterError, match="asks for fewer"):
        D.distill(base, [GSM8K], out, opts(responses="data", limit=1), progress=False)


def test_folder_with_other_files_is_refused(base, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CTCDrafterError, match="did not write"):
        D.distill(base, [GSM8K], tmp_path, opts(responses="data", limit=1), overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").exists()


def test_data_mode_needs_replies(base, tmp_path):
    with pytest.raises(CTCDrafterError, match="--responses base"):
        D.distill(base, [MT_BENCH], tmp_path / "x", opts(responses="data", limit=1), progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_distills_and_reports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["distill", "--data", str(GSM8K), "--base-model", str(tiny_model_dir), "--out", str(out),
               "--limit", "2", "--responses", "data", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sequences"] == 2 and res["complete"] and res["shards"] == len(read_manifest(out)["shards"])
    rc = main(["distill", "--data", str(GSM8K), "--base-model", str(tiny_model_dir), "--out", str(out),
               "--limit", "2", "--responses", "data"])
    cap = capsys.readouterr()
    assert rc == 0 and "already complete" in cap.err and "2 sequences" in cap.out


@pytest.mark.parametrize("extra, msg", [
    (["--data", "/nonexistent.jsonl"], "data file not found"),
    (["--data", str(MT_BENCH), "--responses", "data"], "--responses base"),
    (["--data", str(GSM8K), "--max-length", "1"], "--max-length must be at least 2"),
])
def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, extra, msg):
    rc = main(["distill", "--base-model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--limit", "1", *extra])
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bars
    assert rc == 2 and last.startswith("ctc-drafter: error:") and msg in last and "Traceback" not in err
