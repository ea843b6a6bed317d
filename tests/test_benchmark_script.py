"""scripts/benchmark.py: question windows keep the stride aligned, and the summary compares methods on
the questions all of them answered (a bench stopped part-way still gives a like-for-like table)."""

import json
import types

from conftest import load_script


def _load():
    return load_script("benchmark")


def _mt_bench(tmp_path, n):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": 100 + i, "category": "writing", "turns": ["a", "b"]}) + "\n"
                         for i in range(n)))
    return f


def test_windows_cover_the_selection_once_with_the_stride_aligned(tmp_path):
    from ctc_drafter.evaluation.questions import load_questions

    bm = _load()
    qf = _mt_bench(tmp_path, 23)
    cases = [(0, None, 1, 8, 0), (0, None, 5, 2, 0), (3, 20, 2, 3, 0), (0, None, 1, 0, 0), (0, None, 1, 0, 10),
             (2, 21, 1, 0, 4)]
    for begin, end, stride, chunk, spread in cases:
        a = types.SimpleNamespace(question_file=str(qf), bench="mt_bench", question_begin=begin, question_end=end,
                                  question_stride=stride, chunk=chunk, spread=spread)
        want = [q.question_id for q in load_questions(qf, "mt_bench", begin, end, stride)]
        got = []
        for b, e, s in bm.windows(a):
            sel = [q.question_id for q in load_questions(qf, "mt_bench", b, e, s)]
            assert chunk == 0 or len(sel) <= chunk
            if spread:  # each window takes every spread-th question: an even spread over the file
                assert all(y - x == spread for x, y in zip(sel, sel[1:]))
            got += sel
        assert sorted(got) == want, (begin, end, stride, chunk, spread)
        assert len(got) == len(set(got))


def test_summary_counts_only_questions_every_method_answered(tmp_path):
    bm = _load()

    def answers(ids, cut_last=False):
        lines = [json.dumps({"question_id": i, "choices": [{"turns": ["x"]}]}) for i in ids]
        if cut_last:
            lines[-1] = lines[-1][:20]  # a process killed mid-write
        return "\n".join(lines) + "\n"

    (tmp_path / "hf.jsonl").write_text(answers([1, 2, 3, 4]))
    (tmp_path / "ctc.jsonl").write_text(answers([2, 3, 1]))
    (tmp_path / "ce.jsonl").write_text(answers([1, 2, 3], cut_last=True))
    out = bm.common_questions({n: tmp_path / f"{n}.jsonl" for n in ("hf", "ctc", "ce")}, tmp_path / "common")
    for name, path in out.items():
        ids = sorted(json.loads(l)["question_id"] for l in path.read_text().splitlines())
        assert ids == [1, 2], name


def test_every_method_runs_in_every_dtype_against_hf_in_the_same_dtype():
    bm = _load()
    a = types.SimpleNamespace(budget=None, medusa_budget=None, ctc_draft="d", ce_draft=None, only=None,
                              dtypes="float32,bfloat16", cpu_kernels="packed", threads="1")
    got = {n: e for n, e in bm.methods(a) if n != bm.LLAMA_ROW}  # llama.cpp's row: one, any dtype (test_llamacpp_engine)
    names = [n for n, _ in bm.base_methods(a)]
    assert set(got) == {f"{n}@{d}" for n in names for d in ("float32", "bfloat16")}
    for name, extra in got.items():
        dtype = name.split("@")[1]
        assert extra[extra.index("--dtype") + 1] == dtype
        assert ("--cpu-kernels" in extra) == (not name.startswith("hf-"))  # HF runs its own stock layers
        assert bm.baseline_of(name) == f"hf-generate@{dtype}"
    a.dtypes = "auto"
    assert "hybrid" in dict(bm.methods(a)) and bm.baseline_of("hybrid") == "hf-generate"


def test_a_compiled_backend_is_compared_with_its_own_greedy():
    bm = _load()
    a = types.SimpleNamespace(budget=None, medusa_budget=None, ctc_draft="d", ce_draft=None, only=None,
                              dtypes="auto", backend_also=["compiled-int4"])
    got = dict(bm.base_methods(a))
    assert got["compiled-int4-vanilla"] == ["--baseline", "--backend", "compiled-int4"]
    assert got["compiled-int4-default"] == ["--draft-model", "d", "--backend", "compiled-int4"]
    assert bm.baseline_of("compiled-int4-default") == "compiled-int4-vanilla"
    assert bm.baseline_of("compiled-int4-vanilla") == "hf-generate"  # how far int4 moves the answers from HF's
    assert bm.baseline_of("compiled-int4-default@bfloat16") == "compiled-int4-vanilla@bfloat16"


def test_parts_share_the_windows_and_their_answers_tabulate_as_one(tmp_path):
    bm = _load()
    import argparse

    ap = argparse.ArgumentParser()
    assert bm.parse_part(None, ap) == (1, 1) and bm.parse_part("2/3", ap) == (2, 3)
    for bad in ("0/2", "3/2", "x/2", "1"):
        try:
            bm.parse_part(bad, ap)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(bad)
    # two --part runs answered different questions; read together, every question counts once
    (tmp_path / "p1").mkdir(), (tmp_path / "p2").mkdir()
    for part, ids in (("p1", [1, 3]), ("p2", [2, 4])):
        for name in ("hf", "ctc"):
            (tmp_path / part / f"{name}.jsonl").write_text(
                "".join(json.dumps({"question_id": i, "choices": [{"turns": ["x"]}]}) + "\n" for i in ids))
    files = {n: [tmp_path / p / f"{n}.jsonl" for p in ("p1", "p2")] for n in ("hf", "ctc")}
    out = bm.common_questions(files, tmp_path / "common")
    for path in out.values():
        assert sorted(json.loads(l)["question_id"] for l in path.read_text().splitlines()) == [1, 2, 3, 4]


def test_extra_drafts_run_alone_and_in_the_hybrid():
    bm = _load()
    a = types.SimpleNamespace(budget=4, medusa_budget=None, ctc_draft="d", ce_draft=None, only=None,
                              draft=["ar=runs/ar", "ar-noctc=runs/ar0"])
    got = dict(bm.base_methods(a))
    assert got["ar-prefix"][:2] == ["--draft-model", "runs/ar"] and "prefix" in got["ar-noctc-prefix"]
    assert got["ar-hybrid"][:4] == ["--draft-model", "runs/ar", "--proposer", "hybrid"]
    assert "--always-speculate" in got["ar-prefix-always"] and "--always-speculate" not in got["ar-prefix"]
    assert got["ar-noctc-hybrid"][-2:] == ["--budget", "4"]
    assert [n for n in got][-4:] == ["hybrid", "ar-hybrid", "ar-noctc-hybrid", "hf-prompt-lookup"]


def test_hf_also_adds_one_hf_reference_in_another_dtype():
    bm = _load()
    a = types.SimpleNamespace(budget=None, medusa_budget=None, ctc_draft="d", ce_draft=None, only="hf-generate,hybrid",
                              dtypes="bfloat16", cpu_kernels="auto", threads="1", hf_also=["float32", "bfloat16"])
    got = dict(bm.methods(a))
    assert list(got) == ["hf-generate", "hybrid", "hf-generate@float32"]  # bfloat16 is the bench's own dtype
    extra = got["hf-generate@float32"]
    assert extra[extra.index("--dtype") + 1] == "float32" and "--engine" in extra and "--cpu-kernels" not in extra


def test_arm_steps_sum_over_questions_and_turns(tmp_path):
    bm = _load()
    f = tmp_path / "hybrid.jsonl"
    recs = [{"question_id": 1, "choices": [{"arm_steps": [{"full": 3, "plain": 1}, {"full": 2, "cheap": 4}]}]},
            {"question_id": 2, "choices": [{"arm_steps": [{"plain": 5}]}]},
            {"question_id": 3, "choices": [{"turns": ["written before the switch existed"]}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert bm.arm_steps(f) == {"full": 5, "plain": 6, "cheap": 4}


def test_ctc_ab_runs_a_draft_alone_with_the_transform_on_and_off_and_default_with_the_defaults():
    bm = _load()
    a = types.SimpleNamespace(budget=None, medusa_budget=None, ctc_draft="d", ce_draft=None, only="r-on,r-off,r-default",
                              dtypes="auto", cpu_kernels="packed", threads="1", ctc_ab=["r=runs/ref"],
                              default_with=["r=runs/ref"])
    got = dict(bm.methods(a))
    assert set(got) == {"r-on", "r-off", "r-default"}
    for mode in ("on", "off"):
        extra = got[f"r-{mode}"]
        assert extra[extra.index("--ctc-transform") + 1] == mode and "--always-speculate" in extra
        assert extra[extra.index("--draft-model") + 1] == "runs/ref" and "--generator" not in extra
    assert got["r-default"][:2] == ["--draft-model", "runs/ref"]
    assert not {"--proposer", "--generator", "--budget", "--always-speculate"} & set(got["r-default"])
