"""make-prompts: the base writes user turns after its chat template's user header; filtered, resumable."""

from __future__ import annotations

import json

import pytest

from ctc_drafter.cli.main import main
from ctc_drafter.data import self_prompts as S
from ctc_drafter.data.conversations import iter_conversations
from ctc_drafter.data.near_duplicates import NearDuplicateIndex, jaccard, shingles
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import load_base_model
from ctc_drafter.models.templates import build_prompt_ids


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float64")


def test_user_header_is_what_opens_every_user_turn(smol_tokenizer):
    header, closing = S.user_header(smol_tokenizer)
    for text in ("Hello", "Why is the sky blue?\nExplain."):
        prompt = build_prompt_ids(smol_tokenizer, [{"role": "user", "content": text}])
        assert prompt[: len(header)] == header
        rest = prompt[len(header):]
        assert smol_tokenizer.decode(rest[: len(smol_tokenizer.encode(text))]) == text
        assert rest[len(smol_tokenizer.encode(text))] in closing  # <|im_end|> closes the user's text
    assert smol_tokenizer.decode(header).endswith("<|im_start|>user\n")


def test_a_tokenizer_without_chat_template_is_refused(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    with pytest.raises(CTCDrafterError, match="chat template"):
        S.user_header(smol_tokenizer)


@pytest.mark.parametrize("text, ended, reason", [
    ("Can you help me plan a trip to Rome?", True, None),
    ("Can you help me plan a trip to Rome?", False, "unfinished"),
    ("Hi there", True, "shorter"),
    ("¿Puedes ayudarme con un viaje a Roma, señor?", True, "English"),
    ("Привет, как дела у тебя сегодня?", True, "ASCII"),
    ("x = 1; y = 2; z = 3", True, "English"),
])
def test_filters(text, ended, reason):
    got = S.rejection(text, ended, S.PromptOptions())
    assert (got is None) if reason is None else (reason in got)


def test_near_duplicates_are_found_and_distinct_texts_kept():
    a = "Can you give me three tips for learning to play the guitar as an adult beginner?"
    b = "Can you give me three tips for learning to play the guitar as an adult beginner please?"
    c = "Write a short poem about autumn leaves falling in a quiet park at dusk."
    assert jaccard(shingles(a), shingles(b)) >= 0.7 > jaccard(shingles(a), shingles(c))
    idx = NearDuplicateIndex(0.7)
    assert idx.add(a) is None and idx.add(c) is None
    assert idx.add(b) == 0 and idx.add(a.upper()) == 0  # case and spacing do not matter
    assert len(idx.sets) == 2


def test_make_prompts_writes_a_question_file_distill_reads_and_resumes(base, tmp_path, monkeypatch):
    # the tiny random model writes gibberish: keep everything it finishes, so the plumbing is what is tested
    opts = S.PromptOptions(count=6, max_new_tokens=8, batch_size=4, min_words=1, min_ascii=0, min_english=0,
                           dedup_threshold=1.0)
    monkeypatch.setattr(base.model.generation_config, "eos_token_id", list(range(0, base.config.vocab_size, 3)))
    out = tmp_path / "p.jsonl"
    first = S.make_prompts(base, out, opts, progress=False)
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    rejected = [json.loads(l) for l in S.rejected_path(out).read_text().splitlines()]
    assert first["kept"] + first["rejected"] == 6 and first["kept"] == len(kept) >= 1
    assert sorted(r["seed"] for r in kept + rejected) == list(range(6))
    assert all(r["turns"][0] and r["settings"]["temperature"] == 1.0 for r in kept)
    assert [c.users for c in iter_conversations([out])] == [r["turns"] for r in kept]  # distill's reader takes it

    # seeds are reproducible on their own: a rerun of seed 4 alone gives its text again
    s4 = next((r for r in kept if r["seed"] == 4), None)
    if s4 is not None:
        header, closing = S.user_header(base.tokenizer)
        assert S.sample_user_turns(base, header, closing, [4], opts)[0][0] == s4["turns"][0]

    calls = []
    real = S.sample_user_turns
    monkeypatch.setattr(S, "sample_user_turns", lambda b, h, c, seeds, o: calls.append(seeds) or real(b, h, c, seeds, o))
    again = S.make_prompts(base, out, opts, progress=False)
    assert calls == [] and again == first  # nothing left to do
    more = S.make_prompts(base, out, S.PromptOptions(**{**opts.__dict__, "count": 9}), progress=False)
    assert calls == [[6, 7, 8]] and more["kept"] + more["rejected"] == 9


def test_a_cut_last_line_is_dropped_and_other_settings_refused(base, tmp_path):
    out = tmp_path / "p.jsonl"
    rec = {"question_id": "self-0", "turns": ["Hello there friend"], "seed": 0, "settings": {"temperature": 1.0,
           "top_p": 0.95, "max_new_tokens": 256}}
    out.write_text(json.dumps(rec) + "\n" + '{"question_id": "self-1", "tu')
    done = S.read_progress(out, rec["settings"])
    assert [r["seed"] for r in done.kept] == [0]
    assert out.read_text().endswith('"tu')  # reading writes nothing
    done.drop_cut_lines()
    assert out.read_text() == json.dumps(rec) + "\n"
    with pytest.raises(CTCDrafterError, match="other settings"):
        S.read_progress(out, {**rec["settings"], "temperature": 0.7})
    foreign = tmp_path / "q.jsonl"
    foreign.write_text('{"turns": ["hi"]}\n')
    with pytest.raises(CTCDrafterError, match="did not write"):
        S.read_progress(foreign, rec["settings"])


def test_cli_runs_and_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    argv = ["make-prompts", "--base-model", str(tiny_model_dir), "--out", str(out), "--count", "3",
            "--max-new-tokens", "4", "--dtype", "float64", "--device", "cpu", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] + summary["rejected"] == 3
    assert main(argv[:-1] + ["--temperature", "0"]) == 2
    assert main(argv[:-1] + ["--min-words", "9", "--max-words", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("ctc-drafter: error:") == 2 and "Traceback" not in err
