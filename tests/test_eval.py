"""`ctc-drafter eval` end to end on a tiny model (real question files, shipped in tests/data), then
`report` on its answers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import transformers

# transformers 5.24 (pinned) runs the stopping criteria once per pass, so the per-step split of
# prompt lookup is exact; 5.17 (the GPU image) also runs them on candidates, and the engine then
# reports no split rather than a wrong one. Pass counts (idxs) are exact on both.
SPLIT_EXACT = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)

from ctc_drafter.cli.main import main
from ctc_drafter.evaluation.answer_files import reorganize_answer_file
from ctc_drafter.evaluation.eval import answer_question
from ctc_drafter.evaluation.questions import GSM8K_INSTRUCTION, Question, load_questions

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_question.jsonl"  # FastChat's MT-bench questions, the first 2 of each category
GSM8K = DATA / "gsm8k_test_head20.jsonl"  # the first 20 lines of GSM8K's test.jsonl
FASTCHAT_KEYS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}
CHOICE_KEYS = {"index", "turns", "idxs", "new_tokens", "wall_time"}


def lines(path):
    return [json.loads(x) for x in open(path)]


def eval_args(model_dir, bench, answer_dir, model_id, *extra):
    qf = MT_BENCH if bench == "mt_bench" else GSM8K
    return ["eval", "--bench", bench, "--question-file", str(qf), "--question-end", "3", "--base-model",
            str(model_dir), "--draft-model", "untrained", "--model-id", model_id, "--answer-dir", str(answer_dir),
            "--max-new-tokens", "6", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Speculative and baseline answers to 3 questions of each bench (beam for MT-bench, medusa for GSM8K)."""
    d = tmp_path_factory.mktemp("answers")
    for bench, gen in (("mt_bench", "beam"), ("gsm8k", "medusa")):
        assert main(eval_args(tiny_model_dir, bench, d, f"{bench}-spec", "--tree-choices", gen)) == 0
        assert main(eval_args(tiny_model_dir, bench, d, f"{bench}-base", "--baseline")) == 0
    return d


@pytest.mark.parametrize("bench, n_turns", [("mt_bench", 2), ("gsm8k", 1)])
def test_answer_files_follow_fastchat_schema(runs, bench, n_turns):
    for kind in ("spec", "base"):
        recs = lines(runs / f"{bench}-{kind}.jsonl")
        ids = [r["question_id"] for r in recs]
        assert ids == ([81, 82, 91] if bench == "mt_bench" else [0, 1, 2])
        for r in recs:
            assert FASTCHAT_KEYS <= r.keys() and r["model_id"] == f"{bench}-{kind}"
            assert len(r["answer_id"]) == 32 and r["bench"] == bench
            (c,) = r["choices"]
            assert CHOICE_KEYS <= c.keys() and c["index"] == 0
            for key in ("turns", "idxs", "new_tokens", "wall_time", "accept_lengths", "tokens"):
                assert len(c[key]) == n_turns, key
            for j in range(n_turns):
                assert 1 <= c["new_tokens"][j] <= 6 and c["new_tokens"][j] == len(c["tokens"][j])
                assert sum(c["accept_lengths"][j]) == c["new_tokens"][j]
                assert len(c["accept_lengths"][j]) == c["idxs"][j] and c["wall_time"][j] > 0
            m = r["meta"]
            assert m["speculative"] == (kind == "spec") and m["max_new_tokens"] == 6 and m["device"] == "cpu"
            if kind == "spec":
                assert m["generator"] == ("beam" if bench == "mt_bench" else "medusa")
                assert m["draft_trained"] is False and m["budget"] >= 1
        if bench == "mt_bench":
            assert recs[0]["category"] == "writing"


def test_report_on_eval_output(runs, capsys, tmp_path):
    png = tmp_path / "mt.png"
    code = main(["report", str(runs / "mt_bench-spec.jsonl"), "--baseline", str(runs / "mt_bench-base.jsonl"),
                 "--json", "--plot", str(png)])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and png.stat().st_size > 10_000
    assert r["n_questions"] == 3 and r["bench"] == "mt_bench"
    assert r["agreement"] == 1.0 and r["agreement_by"] == "token ids"  # greedy speculation is lossless
    assert r["beta"] >= 1.0 and r["beta_baseline"] == 1.0
    assert r["gamma"] > 0 and r["gamma_mean"] > 0 and "writing" in r["per_category"]
    assert sum(r["accept_length_hist"].values()) == sum(
        c["idxs"][j] for rec in lines(runs / "mt_bench-spec.jsonl") for c in rec["choices"] for j in range(2))

    code = main(["report", str(runs / "gsm8k-spec.jsonl"), "--baseline", str(runs / "gsm8k-base.jsonl"),
                 "--gsm8k-file", str(GSM8K)])
    out = capsys.readouterr().out
    assert code == 0
    assert "agreement with baseline (token ids): 3/3" in out and "GSM8K accuracy: speculative" in out
    # without the flag, the question file recorded in the answers' meta holds the references
    assert main(["report", str(runs / "gsm8k-spec.jsonl"), "--baseline", str(runs / "gsm8k-base.jsonl"), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["gsm8k_accuracy"]
    assert acc["n"] == 3 and acc["reference_file"] == str(GSM8K.resolve())


def test_second_turn_follows_the_models_first_answer():
    """MT-bench turn 2 is asked after the model's own answer to turn 1, not after a reference answer."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def chat(self, messages, template, speculative, seed, **kw):
            self.calls.append([dict(m) for m in messages])
            n = len(self.calls)
            return type("R", (), {"text": f" answer {n} ", "steps": n, "new_tokens": n, "wall_s": 0.1,
                                  "accept_lengths": [1] * n, "tokens": list(range(n)), "stop_reason": "length"})()

    drafter = Recorder()
    (c,) = answer_question(drafter, Question(1, ["first?", "second?"], "x"), True, {}, "auto", None)
    assert drafter.calls[1] == [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "answer 1"},
                                {"role": "user", "content": "second?"}]
    assert c["turns"] == ["answer 1", "answer 2"] and c["idxs"] == [1, 2]


def test_resume_answers_only_missing_questions(runs, tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "resume"
    d.mkdir()
    src = runs / "mt_bench-base.jsonl"
    full = lines(src)
    # a kill mid-run: one complete line and half of the next
    text = open(src).read().splitlines()
    (d / "mt_bench-base.jsonl").write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])
    capsys.readouterr()
    assert main(eval_args(tiny_model_dir, "mt_bench", d, "mt_bench-base", "--baseline")) == 0
    err = capsys.readouterr().err
    assert "1 question(s) already answered" in err and "answering the other 2" in err
    # the closing line names what the timings depend on (auto dtype: bf16 on CPUs with AMX, else fp32)
    assert re.search(r"\((float32|bfloat16), cpu, kernels \S+, \d+ threads\) -> ", err), err
    recs = lines(d / "mt_bench-base.jsonl")
    assert [r["question_id"] for r in recs] == [81, 82, 91]
    assert recs[0]["answer_id"] == full[0]["answer_id"]  # kept, not re-answered
    assert recs[1]["answer_id"] != full[1]["answer_id"]
    assert [r["choices"][0]["tokens"] for r in recs] == [r["choices"][0]["tokens"] for r in full]  # greedy
    # a complete file: nothing left to do, file unchanged
    before = open(d / "mt_bench-base.jsonl").read()
    assert main(eval_args(tiny_model_dir, "mt_bench", d, "mt_bench-base", "--baseline")) == 0
    assert "answering the other 0" in capsys.readouterr().err
    assert open(d / "mt_bench-base.jsonl").read() == before


def test_resume_refuses_to_mix_baseline_and_speculative(runs, tiny_model_dir, tmp_path, capsys):
    shutil.copy(runs / "gsm8k-base.jsonl", tmp_path / "gsm8k-base.jsonl")
    code = main(eval_args(tiny_model_dir, "gsm8k", tmp_path, "gsm8k-base"))  # no --baseline this time
    assert code == 2 and "speculative=True" in capsys.readouterr().err
    # nor speculative answers of another tree (the runs used the device's default budget)
    shutil.copy(runs / "mt_bench-spec.jsonl", tmp_path / "mt_bench-spec.jsonl")
    budget = lines(runs / "mt_bench-spec.jsonl")[0]["meta"]["budget"]
    code = main(eval_args(tiny_model_dir, "mt_bench", tmp_path, "mt_bench-spec", "--tree-choices", "beam",
                          "--budget", str(budget + 1)))
    assert code == 2 and f"budget={budget}" in capsys.readouterr().err


def test_resume_refuses_answers_of_another_draft(tiny_model_dir, tmp_path, capsys):
    """Two drafts saved to the same folder in turn: the answer file records which weights answered."""
    from ctc_drafter.draft import new_draft_for
    from ctc_drafter.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    folder = tmp_path / "draft"
    new_draft_for(base, seed=1).save_pretrained(folder)
    args = [a if a != "untrained" else str(folder) for a in eval_args(tiny_model_dir, "gsm8k", tmp_path, "spec")]
    args[args.index("--question-end") + 1] = "1"
    assert main(args) == 0
    sha = lines(tmp_path / "spec.jsonl")[0]["meta"]["draft_sha256"]
    assert len(sha) == 16
    new_draft_for(base, seed=2).save_pretrained(folder)  # retrained in place
    args[args.index("--question-end") + 1] = "2"
    capsys.readouterr()
    assert main(args) == 2 and f"draft_sha256={sha!r}" in capsys.readouterr().err
    assert len(lines(tmp_path / "spec.jsonl")) == 1


def test_reorganize_sorts_and_deduplicates(tmp_path):
    p = tmp_path / "a.jsonl"
    recs = [{"question_id": 3, "answer_id": "x"}, {"question_id": 1, "answer_id": "y"},
            {"question_id": 3, "answer_id": "z"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert reorganize_answer_file(p) == 2
    assert [(r["question_id"], r["answer_id"]) for r in lines(p)] == [(1, "y"), (3, "z")]


# ---- bad input (all fail before the model loads) -----------------------------------------------

def run_cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_question_file(tmp_path, capsys):
    args = eval_args("unused", "mt_bench", tmp_path, "x")
    args[args.index("--question-file") + 1] = str(tmp_path / "nope.jsonl")
    code, err = run_cli(capsys, args)
    assert code == 2 and "question file not found" in err and "Traceback" not in err


@pytest.mark.parametrize("bench, other, hint", [("mt_bench", GSM8K, "--bench gsm8k"),
                                               ("gsm8k", MT_BENCH, "--bench mt_bench")])
def test_bench_and_file_mismatch(tmp_path, capsys, bench, other, hint):
    args = eval_args("unused", bench, tmp_path, "x")
    args[args.index("--question-file") + 1] = str(other)
    code, err = run_cli(capsys, args)
    assert code == 2 and hint in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flags, msg", [(["--question-begin", "80"], "--question-begin 80 is out of range"),
                                        (["--question-begin", "-1"], "--question-begin -1 is out of range"),
                                        (["--question-begin", "2", "--question-end", "2"], "--question-end 2"),
                                        (["--question-end", "81"], "--question-end 81 is out of range")])
def test_question_range(tmp_path, capsys, flags, msg):
    args = eval_args("unused", "mt_bench", tmp_path, "x")
    i = args.index("--question-end")
    del args[i:i + 2]
    code, err = run_cli(capsys, args + flags)
    assert code == 2 and msg in err


def test_bad_question_line_is_counted_and_skipped(tmp_path, capsys):
    good = open(MT_BENCH).read().splitlines()[:2]
    p = tmp_path / "q.jsonl"
    p.write_text(good[0] + "\nnot json at all\n\n" + good[1] + "\n")
    qs = load_questions(p, "mt_bench")
    err = capsys.readouterr().err
    assert [q.question_id for q in qs] == [81, 82] and len(qs[0].turns) == 2
    assert "q.jsonl:2 is not a JSON object" in err and "skipped 1 bad line" in err


def test_gsm8k_questions_get_line_ids_and_the_instruction():
    qs = load_questions(GSM8K, "gsm8k", 5, 7)
    assert [q.question_id for q in qs] == [5, 6]
    first = json.loads(open(GSM8K).read().splitlines()[5])["question"]
    assert qs[0].turns == [GSM8K_INSTRUCTION + first]


# ---- HF baselines: --engine hf / hf-prompt-lookup ----------------------------------------------

HF_ENGINES = ("hf", "hf-prompt-lookup")


@pytest.fixture(scope="module")
def hf_runs(runs, tiny_model_dir):
    """HF generate and HF prompt-lookup answers to the first 2 questions of each bench, next to `runs`.

    --draft-model names a folder that does not exist: HF engines must not load a draft.
    """
    for bench in ("mt_bench", "gsm8k"):
        for engine in HF_ENGINES:
            args = eval_args(tiny_model_dir, bench, runs, f"{bench}-{engine}", "--engine", engine)
            args[args.index("--question-end") + 1] = "2"
            args[args.index("--draft-model") + 1] = str(runs / "no-such-draft")
            assert main(args) == 0
    return runs


@pytest.mark.parametrize("bench", ["mt_bench", "gsm8k"])
def test_hf_engines_answer_token_for_token_like_our_baseline(hf_runs, bench):
    ours = {r["question_id"]: r for r in lines(hf_runs / f"{bench}-base.jsonl")}
    for engine in HF_ENGINES:
        recs = lines(hf_runs / f"{bench}-{engine}.jsonl")
        assert len(recs) == 2
        for r in recs:
            m = r["meta"]
            assert m["engine"] == engine and m["speculative"] == (engine == "hf-prompt-lookup")
            assert m["prompt_lookup_tokens"] == (10 if engine == "hf-prompt-lookup" else None)
            assert m["draft_model"] is None and m["generator"] is None
            (c,), (mine,) = r["choices"], ours[r["question_id"]]["choices"]
            assert c["tokens"] == mine["tokens"] and c["turns"] == mine["turns"]  # greedy: same answers
            for j in range(len(c["turns"])):
                n = c["new_tokens"][j]
                assert n == len(c["tokens"][j]) and c["wall_time"][j] > 0
                if engine == "hf" or SPLIT_EXACT:  # see SPLIT_EXACT
                    assert sum(c["accept_lengths"][j]) == n and len(c["accept_lengths"][j]) == c["idxs"][j]
                if engine == "hf":
                    assert c["idxs"][j] == n  # one base pass per token, prefill included
                else:
                    assert 1 <= c["idxs"][j] <= n


def test_report_names_the_engines(hf_runs, capsys):
    spec, hf, lookup = (hf_runs / f"mt_bench-{k}.jsonl" for k in ("spec", "hf", "hf-prompt-lookup"))
    assert main(["report", str(spec), "--baseline", str(hf), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["engines"]["baseline"] == "HF generate" and r["engines"]["spec"].startswith("ours, speculative (hybrid beam")
    assert r["n_questions"] == 2 and r["agreement"] == 1.0 and r["agreement_by"] == "token ids"
    assert r["gamma"] > 0 and r["beta_baseline"] == 1.0
    assert "compared on the 2 questions both files answer (1 only in the speculative file" in r["notes"][0]

    assert main(["report", str(spec), "--baseline", str(lookup)]) == 0
    out = capsys.readouterr().out
    assert "  engine:    HF prompt lookup (K=10)" in out and "agreement with baseline (token ids): 2/2" in out
    assert "the baseline file is a speculative run (HF prompt lookup (K=10)), not vanilla" in out

    assert main(["report", str(lookup), "--baseline", str(hf_runs / "mt_bench-base.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "engine:    HF prompt lookup" in out and "engine:    ours, vanilla" in out


@pytest.mark.parametrize("file, engine, held", [("gsm8k-base", "hf", "'ours'"),  # ours, vanilla
                                                ("gsm8k-hf", "hf-prompt-lookup", "'hf'")])
def test_resume_refuses_another_engine(hf_runs, tiny_model_dir, tmp_path, capsys, file, engine, held):
    shutil.copy(hf_runs / f"{file}.jsonl", tmp_path / f"{file}.jsonl")
    code = main(eval_args(tiny_model_dir, "gsm8k", tmp_path, file, "--engine", engine))
    assert code == 2 and f"engine={held} but this run has engine='{engine}'" in capsys.readouterr().err


def test_resume_refuses_another_prompt_lookup_size(hf_runs, tiny_model_dir, tmp_path, capsys):
    shutil.copy(hf_runs / "gsm8k-hf-prompt-lookup.jsonl", tmp_path)
    code = main(eval_args(tiny_model_dir, "gsm8k", tmp_path, "gsm8k-hf-prompt-lookup", "--engine", "hf-prompt-lookup",
                          "--prompt-lookup-tokens", "4"))
    assert code == 2 and "prompt_lookup_tokens=10 but this run has prompt_lookup_tokens=4" in capsys.readouterr().err


@pytest.mark.parametrize("flags, msg", [(["--engine", "hf", "--baseline"], "--baseline is our own vanilla loop"),
                                        (["--engine", "hf", "--prompt-lookup-tokens", "3"],
                                         "--prompt-lookup-tokens applies only to --engine hf-prompt-lookup"),
                                        (["--engine", "hf-prompt-lookup", "--prompt-lookup-tokens", "0"],
                                         "--prompt-lookup-tokens must be between 1 and")])
def test_bad_engine_flags(tmp_path, capsys, flags, msg):
    code, err = run_cli(capsys, eval_args("unused", "mt_bench", tmp_path, "x") + flags)
    assert code == 2 and msg in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def copy_model():
    """A 1-layer float64 Llama whose next token is always its input token (attention and MLP write nothing).

    Greedy from a prompt ending in 5 repeats 5, so prompt lookup's candidates (copied from the 5s of the
    prompt) are all accepted: passes and tokens per pass are known by hand.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc_drafter.models.base import BaseModel

    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=31,
                      pad_token_id=31, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(32))
        m.lm_head.weight.copy_(torch.eye(32))
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return BaseModel(m, None, "copy")


@pytest.mark.parametrize("k, steps, accept, inputs", [
    (None, 8, [1] * 8, [7] + [1] * 7),  # plain generate: prefill, then one token per pass
    # lookup, K=3, 8 tokens: pass 1 = prompt (7) + 3 candidates, all right, + bonus = 4 tokens;
    # pass 2 = last token + 3 candidates -> 4 more, the budget
    (3, 2, [4, 4], [10, 4]),
])
def test_hf_engine_counts_base_passes(k, steps, accept, inputs):
    import functools

    from ctc_drafter.decoding import CTCDrafter
    from ctc_drafter.evaluation.hf_engine import HFEngine

    base = copy_model()
    prompt = [3, 5, 5, 5, 5, 5, 5]
    ours = CTCDrafter(base).generate(prompt, max_new_tokens=8, speculative=False)
    seen = []  # input lengths of the model's forward calls, counted apart from the engine's own hook
    forward = base.model.forward

    @functools.wraps(forward)
    def counted(*a, **kw):
        seen.append(kw["input_ids"].shape[1])
        return forward(*a, **kw)

    base.model.forward = counted
    res = HFEngine(base, prompt_lookup_tokens=k).generate(prompt, max_new_tokens=8)
    assert res.tokens == ours.tokens == [5] * 8 and res.stop_reason == "length"
    assert seen == inputs and res.steps == len(seen) == steps
    assert res.accept_lengths == (accept if SPLIT_EXACT or k is None else [])


def test_question_stride_takes_one_per_category():
    from ctc_drafter.evaluation.questions import load_questions

    qs = load_questions(MT_BENCH, "mt_bench", stride=2)  # the fixture holds 2 questions of each category
    assert len(qs) == 8 and len({q.category for q in qs}) == 8


def test_report_margins_rebuild_the_diverging_prefix(runs, tiny_model_dir, tmp_path, capsys):
    """A forced divergence in question 82's second turn: the margin is taken where the baseline chose its
    token, so the rebuilt prompt (turn 1 with its answer, then turn 2 and the shared tokens) must make that
    token the base's argmax."""
    recs = lines(runs / "mt_bench-base.jsonl")
    for r in recs:
        if r["question_id"] == 82:
            toks = r["choices"][0]["tokens"][1]
            assert len(toks) >= 4
            toks[3] = (toks[3] + 1) % 100
    fake = tmp_path / "diverged.jsonl"
    fake.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code = main(["report", str(fake), "--baseline", str(runs / "mt_bench-base.jsonl"), "--json", "--margins",
                 "--question-file", str(MT_BENCH), "--base-model", str(tiny_model_dir)])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["n_identical"] == 2
    (m,) = r["divergence_margins"]
    assert (m["question_id"], m["turn"], m["index"]) == (82, 1, 3)
    assert m["baseline_is_top1"] and m["chosen_gap"] >= m["top2_margin"] >= 0
    assert main(["report", str(fake), "--baseline", str(runs / "mt_bench-base.jsonl"), "--margins"]) == 2
    assert "--question-file" in capsys.readouterr().err


def test_default_answer_folder_is_fastchats_layout(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """FastChat's judge reads data/{bench}/model_answer/{model_id}.jsonl: eval writes there by default."""
    monkeypatch.chdir(tmp_path)
    args = eval_args(tiny_model_dir, "mt_bench", "unused", "m", "--baseline", "--question-end", "1")
    i = args.index("--answer-dir")
    del args[i:i + 2]
    assert main(args) == 0
    assert [r["question_id"] for r in lines(tmp_path / "data" / "mt_bench" / "model_answer" / "m.jsonl")] == [81]
