"""`ctc-drafter report` on hand-made answer files whose gamma, beta and agreement are worked out by hand."""

from __future__ import annotations

import json

import pytest

from ctc_drafter.cli.main import main
from ctc_drafter.evaluation.answer_files import ANSWER_FORMAT
from ctc_drafter.evaluation.questions import extract_final_number
from ctc_drafter.evaluation.report import build_report
from ctc_drafter.evaluation.report_render import format_report


def record(qid, turns, new_tokens, wall, idxs=None, tokens=None, accept=None, category=None, bench="mt_bench",
           ours=True, model_id="m"):
    c = {"index": 0, "turns": turns, "new_tokens": new_tokens, "wall_time": wall}
    if idxs is not None:
        c["idxs"] = idxs
    if tokens is not None:
        c["tokens"] = tokens
    if accept is not None:
        c["accept_lengths"] = accept
    r = {"question_id": qid, "answer_id": f"a{qid}", "model_id": model_id, "choices": [c], "tstamp": 0.0}
    if ours:
        r.update(bench=bench, category=category, meta={"format": ANSWER_FORMAT, "bench": bench, "temperature": 0.0})
    return r


def write(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def run_report(capsys, *argv):
    code = main(["report", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def hand_made(tmp_path):
    """Two MT-bench questions in two categories.

    spec  q1: 30+10 tokens in 1.0+1.0 s, 10+5 steps   q2: 25+35 tokens in 1.5+1.5 s, 8+12 steps
    base  q1: 40 tokens in 4.0 s                      q2: 60 tokens in 12.0 s
    """
    spec = [record(1, ["a", "b"], [30, 10], [1.0, 1.0], idxs=[10, 5], category="writing",
                   accept=[[3] * 10, [2] * 5]),
            record(2, ["c", "d"], [25, 35], [1.5, 1.5], idxs=[8, 12], category="math",
                   accept=[[1, 4, 4, 4, 4, 4, 4, 0], [3] * 11 + [2]])]
    base = [record(1, ["a", "b"], [20, 20], [2.0, 2.0], idxs=[20, 20], category="writing"),
            record(2, ["c", "d"], [30, 30], [6.0, 6.0], idxs=[30, 30], category="math")]
    return write(tmp_path / "spec.jsonl", spec), write(tmp_path / "base.jsonl", base)


def test_gamma_beta_by_hand(hand_made, capsys):
    code, out, _ = run_report(capsys, hand_made[0], "--baseline", hand_made[1], "--json")
    assert code == 0
    r = json.loads(out)
    # spec: 100 tokens / 5 s = 20 tok/s; base: 100 tokens / 16 s = 6.25 tok/s
    assert r["gamma"] == pytest.approx(20 / 6.25)
    # per question: q1 (40/2)/(40/4) = 2, q2 (60/3)/(60/12) = 4
    assert r["gamma_mean"] == pytest.approx(3.0)
    assert r["beta"] == pytest.approx(100 / 35)
    assert r["beta_baseline"] == pytest.approx(1.0)
    assert r["n_questions"] == 2
    assert r["per_category"]["writing"]["gamma"] == pytest.approx(2.0)
    assert r["per_category"]["writing"]["beta"] == pytest.approx(40 / 15)
    assert r["per_category"]["math"]["gamma"] == pytest.approx(4.0)
    assert r["per_category"]["math"]["beta"] == pytest.approx(60 / 20)
    assert r["accept_length_hist"] == {"0": 1, "1": 1, "2": 6, "3": 21, "4": 6}
    # passes emitting >= 1, 2, 3, 4 tokens: 34, 33, 27, 6; the d-th draft token's rate is (>= d+1) / (>= d)
    assert r["accept_rate_by_depth"] == pytest.approx({"1": 33 / 34, "2": 27 / 33, "3": 6 / 27})
    # no token ids, so agreement falls back to the texts, which match
    assert r["agreement"] == 1.0 and r["agreement_by"] == "text"


def test_text_table_and_plot(hand_made, tmp_path, capsys):
    png = tmp_path / "plots" / "report.png"
    code, out, _ = run_report(capsys, hand_made[0], "--baseline", hand_made[1], "--plot", png)
    assert code == 0
    assert "3.200x" in out and "3.000x" in out  # gamma, gamma_mean
    assert "writing" in out and "math" in out and "all" in out
    assert "given the d - 1 before it were: 1: 97.1%, 2: 81.8%, 3: 22.2%" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real figure, not an empty canvas


def test_token_agreement_and_first_divergence(tmp_path, capsys):
    spec = [record(1, ["x", "y"], [3, 4], [1, 1], idxs=[2, 2], tokens=[[1, 2, 3], [4, 5, 6, 7]]),
            record(2, ["x", "yy"], [3, 4], [1, 1], idxs=[2, 2], tokens=[[1, 2, 3], [4, 5, 6, 9]])]
    base = [record(1, ["x", "y"], [3, 4], [1, 1], idxs=[3, 4], tokens=[[1, 2, 3], [4, 5, 6, 7]]),
            record(2, ["x", "y"], [3, 4], [1, 1], idxs=[3, 4], tokens=[[1, 2, 3], [4, 5, 6, 8]])]
    code, out, _ = run_report(capsys, write(tmp_path / "s.jsonl", spec), "--baseline",
                              write(tmp_path / "b.jsonl", base), "--json")
    r = json.loads(out)
    assert r["agreement"] == 0.5 and r["agreement_by"] == "token ids"
    (d,) = r["divergences"]
    assert (d["question_id"], d["turn"], d["by"], d["index"]) == (2, 1, "token", 3)


def test_text_divergence_char_index(tmp_path):
    spec = [record(1, ["same", "hello world"], [1, 2], [1, 1], idxs=[1, 1])]
    base = [record(1, ["same", "hello there"], [1, 2], [1, 1], idxs=[1, 2])]
    r = build_report(write(tmp_path / "s.jsonl", spec), write(tmp_path / "b.jsonl", base))
    (d,) = r["divergences"]
    assert (d["turn"], d["by"], d["index"]) == (1, "char", 6)
    assert "first differs at turn 2, char 6" in format_report(r)


def reference_files(tmp_path, base_tokens=None):
    """The reference implementation's format: no meta, idxs are 0-based loop indices, baseline new_tokens 0."""
    spec = [record(81, ["one two", "three"], [12, 6], [1.0, 0.5], idxs=[3, 1], ours=False),
            record(82, ["four", "five six"], [8, 10], [0.5, 1.0], idxs=[1, 2], ours=False)]
    base = [record(81, ["one two", "three"], [0, 0], [3.0, 1.5], idxs=[11, 5], ours=False),
            record(82, ["four", "five six"], [0, 0], [2.0, 2.0], idxs=[7, 9], ours=False)]
    if base_tokens:
        for r, toks in zip(base, base_tokens):
            r["choices"][0]["tokens"] = toks
    return write(tmp_path / "ref_spec.jsonl", spec), write(tmp_path / "ref_base.jsonl", base)


def test_reference_baseline_without_counts_is_one_token_per_loop_step(tmp_path, capsys):
    """The reference baseline files record new_tokens 0 and no ids: a plain loop's idxs + 1 tokens a turn."""
    s, b = reference_files(tmp_path)
    code, out, err = run_report(capsys, s, "--baseline", b, "--json")
    assert code == 0
    r = json.loads(out)
    # base: idxs 11, 5, 7, 9 -> 12 + 6 + 8 + 10 = 36 tokens in 8.5 s; spec: 36 tokens in 3 s
    assert r["new_tokens"]["baseline"] == 36 and r["token_count"]["baseline"] == {"loop steps": 4}
    assert r["gamma"] == pytest.approx(12 / (36 / 8.5)) and r["beta_baseline"] == pytest.approx(1.0)
    # spec steps = idxs + 1: (4 + 2) + (2 + 3) = 11 for 36 tokens
    assert r["beta"] == pytest.approx(36 / 11)
    assert any("counted as idxs + 1 tokens each" in n for n in r["notes"])
    assert "gamma could not be computed" not in err


def test_reference_baseline_without_counts_or_idxs_says_gamma_cannot_be_computed(tmp_path, capsys):
    s, b = reference_files(tmp_path)
    recs = [json.loads(x) for x in open(b)]
    for rec in recs:
        del rec["choices"][0]["idxs"]
    b = write(tmp_path / "ref_base_noidx.jsonl", recs)
    code, out, err = run_report(capsys, s, "--baseline", b, "--json")
    r = json.loads(out)
    assert code == 0 and r["gamma"] is None and r["gamma_mean"] is None
    assert any("gamma cannot be computed" in n for n in r["notes"])
    assert "gamma could not be computed" in err
    code, out, _ = run_report(capsys, s, "--baseline", b)
    assert "n/a" in out and "cannot be computed" in out


def test_reference_format_counts_from_stored_ids(tmp_path, capsys):
    s, b = reference_files(tmp_path, base_tokens=[[[1] * 12, [2] * 6], [[3] * 8, [4] * 10]])
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json")[1])
    # spec 36 tokens / 3 s = 12 tok/s; base 36 tokens / 8.5 s
    assert r["gamma"] == pytest.approx(12 / (36 / 8.5))
    assert r["token_count"]["baseline"] == {"token ids": 4}
    assert any("stored token ids" in n for n in r["notes"])
    assert r["beta_baseline"] == pytest.approx(36 / 36)  # idxs 11,5,7,9 -> 12+6+8+10 steps


TEXTS = [["The sky is blue because air scatters short wavelengths more.", "Rayleigh scattering, mostly."],
         ["Paris is the capital of France.", "It has about two million inhabitants."]]


def retokenize_files(tmp_path, spec_counts):
    """Reference-format files whose baseline records neither counts, ids nor idxs: only a re-count helps."""
    spec = [record(81 + i, TEXTS[i], spec_counts[i], [1.0, 1.0], idxs=[3, 3], ours=False) for i in range(2)]
    base = [record(81 + i, TEXTS[i], [0, 0], [2.0, 2.0], ours=False) for i in range(2)]
    return write(tmp_path / "rs.jsonl", spec), write(tmp_path / "rb.jsonl", base)


def test_reference_format_retokenizes_with_the_files_tokenizer(tmp_path, capsys, tiny_model_dir, smol_tokenizer):
    # recorded = the answer's tokens plus the end token, as a decoding loop counts them
    counts = [[len(smol_tokenizer.encode(t, add_special_tokens=False)) + 1 for t in q] for q in TEXTS]
    s, b = retokenize_files(tmp_path, counts)
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json", "--tokenizer", tiny_model_dir)[1])
    n = sum(len(smol_tokenizer.encode(t, add_special_tokens=False)) for q in TEXTS for t in q)
    assert r["new_tokens"]["baseline"] == n
    assert r["gamma"] == pytest.approx((sum(map(sum, counts)) / 4.0) / (n / 8.0))
    assert any("re-tokenizing" in x for x in r["notes"])


def test_retokenizing_with_another_models_tokenizer_is_refused(tmp_path, capsys, tiny_model_dir, smol_tokenizer):
    # counts of a tokenizer that splits far finer than SmolLM2's (another model family)
    counts = [[3 * len(smol_tokenizer.encode(t, add_special_tokens=False)) for t in q] for q in TEXTS]
    s, b = retokenize_files(tmp_path, counts)
    code, out, err = run_report(capsys, s, "--baseline", b, "--tokenizer", tiny_model_dir)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "does not match the answer files' model" in err


def test_retokenizing_that_no_recorded_count_can_check_warns(tmp_path, capsys, tiny_model_dir):
    s, b = retokenize_files(tmp_path, [[0, 0], [0, 0]])
    code, out, err = run_report(capsys, s, "--baseline", b, "--tokenizer", tiny_model_dir, "--json")
    assert code == 0 and "ctc-drafter: warning: no turn records its token count" in err


def gsm8k_file(tmp_path, answers):
    p = tmp_path / "gsm8k_test.jsonl"
    p.write_text("".join(json.dumps({"question": f"question {i}?", "answer": a}) + "\n" for i, a in enumerate(answers)))
    return p


def test_gsm8k_accuracy_with_a_900_digit_reference(tmp_path, capsys):
    """Numbers are compared as digits: a huge reference neither overflows nor rounds onto another."""
    big = "9" * 900
    ref = gsm8k_file(tmp_path, [f"#### {big}", "#### 100000000000000000001"])
    spec = [record(0, [f"### {big}"], [5], [1.0], idxs=[2], bench="gsm8k"),
            record(1, ["### 100000000000000000000"], [5], [1.0], idxs=[2], bench="gsm8k")]
    s = write(tmp_path / "s.jsonl", spec)
    code, out, err = run_report(capsys, s, "--baseline", s, "--json", "--gsm8k-file", ref)
    assert code == 0, err
    acc = json.loads(out)["gsm8k_accuracy"]
    assert (acc["n"], acc["spec_correct"]) == (2, 1)


def test_gsm8k_accuracy(tmp_path, capsys):
    ref = gsm8k_file(tmp_path, ["... so she makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "2/2=1 bolt; 2+1=3\n#### 3"])
    spec = [record(0, ["She makes 9 * 2 = 18.\n### Answer: $18"], [5], [1.0], idxs=[2], bench="gsm8k"),
            record(1, ["2 + 1 = 3, no wait, 4"], [5], [1.0], idxs=[2], bench="gsm8k")]
    base = [record(0, ["The answer is 18 dollars."], [5], [2.0], idxs=[5], bench="gsm8k"),
            record(1, ["It takes 2/2=1 bolt... #### 3"], [5], [2.0], idxs=[5], bench="gsm8k")]
    s, b = write(tmp_path / "s.jsonl", spec), write(tmp_path / "b.jsonl", base)
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json", "--gsm8k-file", ref)[1])
    acc = r["gsm8k_accuracy"]
    assert (acc["n"], acc["spec_correct"], acc["baseline_correct"]) == (2, 1, 2)
    assert r["per_category"].keys() == {"gsm8k"}
    # without --gsm8k-file (and no question file in the answers' meta) there is no hidden default
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json")[1])
    assert r["gsm8k_accuracy"] is None and any("--gsm8k-file" in n for n in r["notes"])


@pytest.mark.parametrize("text, want", [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18", "18"),
    ("### Final answer: Josh made a profit of $70,000.", "70000"),
    ("so the total is 2.50 + 1 = 3.5", "3.5"),
    ("x = -4.0", "-4"),
    ("no numbers here", None),
])
def test_extract_final_number(text, want):
    assert extract_final_number(text) == want


def test_categories_from_question_file(tmp_path, capsys):
    spec = [record(81, ["a", "b"], [4, 4], [1, 1], idxs=[2, 2], ours=False),
            record(101, ["a", "b"], [4, 4], [1, 1], idxs=[2, 2], ours=False)]
    base = [record(81, ["a", "b"], [4, 4], [2, 2], idxs=[3, 3], ours=False),
            record(101, ["a", "b"], [4, 4], [2, 2], idxs=[3, 3], ours=False)]
    s, b = write(tmp_path / "s.jsonl", spec), write(tmp_path / "b.jsonl", base)
    qf = tmp_path / "question.jsonl"
    qf.write_text("".join(json.dumps({"question_id": q, "category": c, "turns": ["x", "y"]}) + "\n"
                          for q, c in ((81, "writing"), (101, "reasoning"), (7, "math"))))
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json", "--question-file", qf)[1])
    assert set(r["per_category"]) == {"writing", "reasoning"}
    assert not any("categor" in n for n in r["notes"])
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json")[1])
    assert set(r["per_category"]) == {"unknown"} and any("pass --question-file" in n for n in r["notes"])
    # passed, but the file does not know these questions: say so, do not ask for the flag again
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["x"]}) + "\n")
    r = json.loads(run_report(capsys, s, "--baseline", b, "--json", "--question-file", other)[1])
    note = next(n for n in r["notes"] if "no category" in n)
    assert "pass --question-file" not in note and str(other) in note


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_json_line_is_counted_and_skipped(hand_made, tmp_path, capsys):
    lines = open(hand_made[0]).read().splitlines()
    s = tmp_path / "s_bad.jsonl"
    s.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    code, out, err = run_report(capsys, s, "--baseline", hand_made[1], "--json")
    assert code == 0
    r = json.loads(out)
    assert r["n_questions"] == 2 and r["gamma"] == pytest.approx(3.2)
    assert "s_bad.jsonl:2 is not a JSON object" in err and "skipped 1 bad line" in err
    assert any("1 bad line" in n for n in r["notes"])


def test_other_bench_baseline_is_refused(hand_made, tmp_path, capsys):
    base = [record(q, ["a"], [5], [1.0], idxs=[5], bench="gsm8k") for q in (1, 2)]
    code, _, err = run_report(capsys, hand_made[0], "--baseline", write(tmp_path / "g.jsonl", base))
    assert code == 2 and "answers mt_bench but baseline" in err and "Traceback" not in err
    # without bench fields (reference files) a different turn count gives it away
    for r in base:
        del r["bench"], r["meta"]
    code, _, err = run_report(capsys, hand_made[0], "--baseline", write(tmp_path / "g2.jsonl", base))
    assert code == 2 and "same benchmark" in err


def test_no_matching_questions(hand_made, tmp_path, capsys):
    base = [record(7, ["a", "b"], [5, 5], [1.0, 1.0], idxs=[5, 5])]
    code, _, err = run_report(capsys, hand_made[0], "--baseline", write(tmp_path / "b.jsonl", base))
    assert code == 2 and "answers none of the 2 questions" in err


@pytest.mark.parametrize("content, msg", [("", "has no answers"), ("garbage\n", "has no answers"),
                                          ('{"foo": 1}\n', "not an answer record")])
def test_empty_or_foreign_files(hand_made, tmp_path, capsys, content, msg):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    code, _, err = run_report(capsys, p, "--baseline", hand_made[1])
    assert code == 2 and msg in err
    code, _, err = run_report(capsys, hand_made[0], "--baseline", p)
    assert code == 2 and msg in err


def test_missing_files(hand_made, tmp_path, capsys):
    code, _, err = run_report(capsys, tmp_path / "nope.jsonl", "--baseline", hand_made[1])
    assert code == 2 and "not found" in err
    code, _, err = run_report(capsys, *hand_made[:1], "--baseline", hand_made[1], "--gsm8k-file", tmp_path / "x")
    assert code == 2 and "--gsm8k-file" in err


def test_unlike_runs_are_flagged(hand_made, tmp_path, capsys):
    spec, base = [json.loads(x) for x in open(hand_made[0])], [json.loads(x) for x in open(hand_made[1])]
    for r in spec:
        r["meta"].update(speculative=True, max_new_tokens=64)
    for r in base:
        r["meta"].update(speculative=True, max_new_tokens=128)
    r = build_report(write(tmp_path / "s.jsonl", spec), write(tmp_path / "b.jsonl", base))
    assert "the runs differ in max_new_tokens: 64 (speculative) vs 128 (baseline)" in r["notes"]
    assert any("not vanilla decoding" in n for n in r["notes"])
