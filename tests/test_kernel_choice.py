"""CPU kernels chosen by measurement (models/kernel_choice.py): the faster kernel per pass size, cached
per machine fingerprint, and still lossless."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models import cpu_kernels, kernel_choice
from ctc_drafter.models.base import BaseModel
from ctc_drafter.models.cpu_kernels import DispatchLinear, PackedLinear, kernel_label, packed_linear_available
from ctc_drafter.models.kernel_choice import REPS, SIZES, apply_cpu_kernels, choose_table
from ctc_drafter.testing import FAKE_CPUS
from test_cpu_kernels import assert_swapped_kernels_lossless

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch build has no oneDNN")

# stock wins a 1-row pass, packed wins every tree: what an Intel Xeon with AMX measured in fp32
STOCK_FOR_ONE_ROW = {"stock": {n: 40.0 + 4 * n for n in SIZES}, "packed": {n: 45.0 + 1.5 * n for n in SIZES}}


class FakeMeasure:
    """Injected timings instead of a stopwatch; counts how often the kernels were 'timed'."""

    def __init__(self, timings, spread=1.0):
        self.timings, self.calls, self.spread = timings, 0, spread

    def __call__(self, base, plan, sizes):
        self.calls += 1
        assert all(isinstance(m, DispatchLinear) for m in base.model.modules() if isinstance(m, nn.Module)
                   and "Linear" in type(m).__name__), "timing must run with every layer switchable"
        # REPS samples per cell, the fastest the given one; `spread` = slowest / fastest sample
        return {k: {n: [t[n] * self.spread, t[n], t[n]][:REPS] for n in sizes} for k, t in self.timings.items()}


def never_measure(base, plan, sizes):
    raise AssertionError("a cached decision must not be timed again")


def tiny_base(dtype=torch.float32, seed=1, **kw):
    return BaseModel(tiny_llama(dtype=dtype, seed=seed), None, "toy", **kw)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """apply_cpu_kernels sets torch's thread count; later tests must not inherit a test's choice."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CTC_DRAFTER_CACHE", str(tmp_path))
    return tmp_path


def count_packed_calls(monkeypatch):
    calls = []
    real = cpu_kernels._packed_linear

    def spy(x, packed, bias):
        calls.append(x.numel() // x.shape[-1])
        return real(x, packed, bias)

    monkeypatch.setattr(cpu_kernels, "_packed_linear", spy)
    return calls


def test_auto_picks_the_faster_kernel_per_size_and_reuses_the_cache(cache_root, monkeypatch):
    stock_model = tiny_base().model
    base = BaseModel(copy.deepcopy(stock_model), None, "toy")
    fake = FakeMeasure(STOCK_FOR_ONE_ROW)
    candidates = kernel_choice.thread_candidates()
    report = apply_cpu_kernels(base, "auto", measure=fake)
    assert fake.calls == len(candidates) and not report.cache_hit  # once per candidate thread count
    assert report.table == [(1, "stock"), (max(SIZES), "packed")] and report.label == "stock<=1,packed"
    assert report.kernel_for(1) == "stock" and report.kernel_for(3) == "packed" and report.kernel_for(500) == "packed"
    assert kernel_label(base.model) == report.label  # what an engine reports without the report at hand
    # the cost model follows the chosen kernel at each size
    assert report.cost.pass_ms(1) == 44.0 and report.cost.pass_ms(8) == STOCK_FOR_ONE_ROW["packed"][8]

    # the layers really dispatch: 1-row calls never reach the packed kernel, tree passes always do
    assert all(isinstance(m, DispatchLinear) for m in base.model.modules() if "Linear" in type(m).__name__)
    packed_rows = count_packed_calls(monkeypatch)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        out = base.model(ids[:, :1]).logits
        assert packed_rows == []
        out6 = base.model(ids).logits
        ref = stock_model(ids).logits
    assert packed_rows and set(packed_rows) == {6}
    assert torch.allclose(out6, ref, rtol=1e-5, atol=1e-5) and torch.allclose(out, ref[:, :1], rtol=1e-5, atol=1e-5)

    # the decision is cached under the fingerprint, with the timings it rests on
    record = json.loads(open(report.cache_file).read())
    assert record["fingerprint"] == kernel_choice.fingerprint(base, threads=candidates)
    assert record["timings_by_threads"][str(report.threads)]["packed"]["8"] == STOCK_FOR_ONE_ROW["packed"][8]
    assert report.cache_file.startswith(str(cache_root / "kernels"))

    again = apply_cpu_kernels(tiny_base(), "auto", measure=never_measure)
    assert again.cache_hit and again.table == report.table and again.timings_ms == report.timings_ms
    assert again.measure_s == 0.0


def test_a_changed_fingerprint_measures_again(cache_root):
    first = FakeMeasure(STOCK_FOR_ONE_ROW)
    cpu = FAKE_CPUS["avx512_bf16"]
    r1 = apply_cpu_kernels(tiny_base(cpu=cpu), "auto", measure=first)
    assert apply_cpu_kernels(tiny_base(cpu=cpu), "auto", measure=never_measure).cache_hit
    packed_everywhere = {"stock": {n: 90.0 for n in SIZES}, "packed": {n: 50.0 for n in SIZES}}
    second = FakeMeasure(packed_everywhere)
    base2 = tiny_base(cpu=replace(cpu, flags=cpu.flags | {"new_isa"}))  # the same CPU name, a new feature
    r2 = apply_cpu_kernels(base2, "auto", measure=second)
    assert second.calls == first.calls and not r2.cache_hit and r2.cache_file != r1.cache_file
    assert r2.label == "packed" and any(isinstance(m, PackedLinear) for m in base2.model.modules())
    # and another thread count is another machine too
    third = FakeMeasure(STOCK_FOR_ONE_ROW)
    r3 = apply_cpu_kernels(tiny_base(), "auto", threads=kernel_choice.thread_candidates()[-1] + 1, measure=third)
    assert third.calls == 1 and r3.cache_file not in (r1.cache_file, r2.cache_file)


def test_a_cache_file_from_another_fingerprint_is_not_trusted(tmp_path):
    path = tmp_path / "k.json"
    apply_cpu_kernels(tiny_base(), "auto", measure=FakeMeasure(STOCK_FOR_ONE_ROW), cache_file=path)
    record = json.loads(path.read_text())
    record["fingerprint"]["torch"] = "0.0-other"
    path.write_text(json.dumps(record))
    fake = FakeMeasure(STOCK_FOR_ONE_ROW)
    assert not apply_cpu_kernels(tiny_base(), "auto", measure=fake, cache_file=path).cache_hit and fake.calls >= 1
    path.write_text("{not json")
    fake = FakeMeasure(STOCK_FOR_ONE_ROW)
    assert not apply_cpu_kernels(tiny_base(), "auto", measure=fake, cache_file=path).cache_hit and fake.calls >= 1


def test_a_single_kernel_plan_settles_into_plain_layers(tmp_path):
    """No dispatch wrapper and no second weight copy when one kernel wins (or is forced)."""
    packed_everywhere = {"stock": {n: 90.0 for n in SIZES}, "packed": {n: 50.0 for n in SIZES}}
    base = tiny_base()
    n_linear = sum(type(m) is nn.Linear for m in base.model.modules())
    r = apply_cpu_kernels(base, "auto", measure=FakeMeasure(packed_everywhere), cache_file=tmp_path / "a.json")
    assert r.label == "packed" and sum(isinstance(m, PackedLinear) for m in base.model.modules()) == n_linear
    assert kernel_label(base.model) == "packed"
    assert base.model.get_output_embeddings().weight is not None  # drafts read the head's rows

    base = tiny_base()
    r = apply_cpu_kernels(base, "stock", measure=never_measure, cache_file=tmp_path / "a.json")
    assert r.cache_hit and r.label == "stock" and sum(type(m) is nn.Linear for m in base.model.modules()) == n_linear
    assert r.cost.pass_ms(4) == 90.0  # forced kernels still get their own cost curve

    base = tiny_base()
    r = apply_cpu_kernels(base, "stock", measure=FakeMeasure(packed_everywhere), cache_file=tmp_path / "b.json")
    assert r.label == "stock" and sum(type(m) is nn.Linear for m in base.model.modules()) == n_linear
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(base.model(ids).logits, tiny_base().model(ids).logits)  # the very same stock layers


def test_choose_table_merges_neighbouring_classes_and_does_not_flap_on_near_ties():
    t = {"stock": {1: 10, 4: 30, 8: 50, 16: 60}, "packed": {1: 12, 4: 20, 8: 40, 16: 70}}
    assert choose_table(t) == [(1, "stock"), (8, "packed"), (16, "stock")]
    assert choose_table({"stock": {1: 5, 4: 5}, "packed": {1: 5, 4: 6}}) == [(4, "stock")]  # ties: first listed
    near = {"stock": {1: 10, 4: 20, 8: 29.5}, "packed": {1: 12, 4: 15, 8: 30}}  # 8 rows: packed within 2%
    assert choose_table(near) == [(1, "stock"), (8, "packed")]


def test_noisy_timings_are_used_but_not_cached(tmp_path):
    """A busy machine's timings choose for this run only; the next load measures again."""
    path = tmp_path / "k.json"
    noisy = FakeMeasure(STOCK_FOR_ONE_ROW, spread=2.0)
    r = apply_cpu_kernels(tiny_base(), "auto", measure=noisy, cache_file=path)
    assert r.label == "stock<=1,packed" and "noisy" in r.note and r.cache_file is None and not path.exists()
    assert "NOT cached" in r.describe()
    calm = FakeMeasure(STOCK_FOR_ONE_ROW, spread=1.1)
    r = apply_cpu_kernels(tiny_base(), "auto", measure=calm, cache_file=path)
    assert calm.calls == len(kernel_choice.thread_candidates()) and not r.note and path.exists()


def test_bad_mode_and_double_application_are_refused(tmp_path):
    with pytest.raises(CTCDrafterError, match="cpu kernels"):
        apply_cpu_kernels(tiny_base(), "fastest")
    base = tiny_base()
    apply_cpu_kernels(base, "packed", measure=FakeMeasure(STOCK_FOR_ONE_ROW), cache_file=tmp_path / "k.json")
    with pytest.raises(CTCDrafterError, match="already"):
        apply_cpu_kernels(base, "auto", cache_file=tmp_path / "k.json")


def test_other_dtypes_are_left_alone(tmp_path):
    base = tiny_base(dtype=torch.float64)
    r = apply_cpu_kernels(base, "auto", measure=never_measure, cache_file=tmp_path / "k.json")
    assert r.label == "stock" and r.cost is None and r.note and not (tmp_path / "k.json").exists()
    assert all(not isinstance(m, (DispatchLinear, PackedLinear)) for m in base.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_measurement_times_every_kernel_and_size(tmp_path, dtype):
    base = tiny_base(dtype=dtype)
    r = apply_cpu_kernels(base, "auto", cache_file=tmp_path / "k.json")
    assert set(r.timings_ms) == {"stock", "packed"} and all(set(t) == set(SIZES) for t in r.timings_ms.values())
    assert all(ms > 0 for t in r.timings_ms.values() for ms in t.values()) and r.measure_s > 0
    assert r.label in ("stock", "packed") or "<=" in r.label
    costs = [r.cost.pass_ms(n) for n in range(1, 80)]
    assert all(b >= a for a, b in zip(costs, costs[1:])) and r.cost.marginal_ms(5) >= 0
    assert "CPU kernels:" in r.describe() and json.dumps(r.to_dict())


@pytest.mark.parametrize("generator,budget", [("beam", 12), ("medusa", 20)])
def test_greedy_with_a_mixed_plan_equals_stock_hf_generate(tmp_path, generator, budget):
    stock = tiny_llama(dtype=torch.float32, seed=1)
    base = BaseModel(copy.deepcopy(stock), None, "toy")
    r = apply_cpu_kernels(base, "auto", measure=FakeMeasure(STOCK_FOR_ONE_ROW), cache_file=tmp_path / "k.json")
    assert r.label == "stock<=1,packed"
    assert_swapped_kernels_lossless(base, stock, generator, budget)


def test_generate_json_reports_the_kernel_choice_and_the_second_run_reads_the_cache(capsys, tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """`generate --json` carries the plan and its timings; a calm measurement is cached for the next run."""
    from ctc_drafter.cli.main import main

    monkeypatch.setattr(kernel_choice, "measure_passes", FakeMeasure(STOCK_FOR_ONE_ROW))  # a calm machine
    monkeypatch.setattr(kernel_choice, "cache_file_for", lambda fp: tmp_path / "kernels.json")
    argv = ["generate", "--base-model", str(tiny_model_dir), "--prompt", "Say hello.", "--max-new-tokens", "6",
            "--json", "--baseline"]
    reports = []
    for _ in range(2):
        assert main(argv) == 0
        reports.append(json.loads(capsys.readouterr().out)["cpu_kernels"])
    first, second = reports
    assert first["label"] == "stock<=1,packed" and first["mode"] == "auto" and not first["cache_hit"]
    assert first["timings_ms"]["packed"]["8"] == STOCK_FOR_ONE_ROW["packed"][8] and first["pass_cost"]["nodes_ms"]
    assert second["cache_hit"] and second["label"] == first["label"] and second["measure_s"] == 0
    assert main(argv + ["--cpu-kernels", "stock"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_kernels"]["label"] == "stock"


class ThreadedMeasure(FakeMeasure):
    """Timings that depend on torch's thread count at the time of 'timing'."""

    def __init__(self, by_threads):
        super().__init__(None)
        self.by_threads = by_threads

    def __call__(self, base, plan, sizes):
        self.timings = self.by_threads[torch.get_num_threads()]
        return super().__call__(base, plan, sizes)


def test_threads_are_chosen_by_measurement_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_choice, "thread_candidates", lambda threads="auto": (1, 2))
    two_faster = {1: STOCK_FOR_ONE_ROW, 2: {k: {n: ms * 0.7 for n, ms in t.items()} for k, t in STOCK_FOR_ONE_ROW.items()}}
    fake = ThreadedMeasure(two_faster)
    r = apply_cpu_kernels(tiny_base(), "auto", measure=fake, cache_file=tmp_path / "a.json")
    assert fake.calls == 2 and r.threads == 2 and torch.get_num_threads() == 2
    assert r.threads_ms[2] < r.threads_ms[1] and "threads 2" in r.describe()
    assert r.cost.pass_ms(8) == pytest.approx(STOCK_FOR_ONE_ROW["packed"][8] * 0.7)  # the chosen count's curve
    torch.set_num_threads(1)
    again = apply_cpu_kernels(tiny_base(), "auto", measure=never_measure, cache_file=tmp_path / "a.json")
    assert again.cache_hit and again.threads == 2 and torch.get_num_threads() == 2

    # two threads that gain less than the tie margin lose to one: they would only take a core from others
    barely = {1: STOCK_FOR_ONE_ROW, 2: {k: {n: ms * 0.99 for n, ms in t.items()} for k, t in STOCK_FOR_ONE_ROW.items()}}
    r = apply_cpu_kernels(tiny_base(), "auto", measure=ThreadedMeasure(barely), cache_file=tmp_path / "b.json")
    assert r.threads == 1 and torch.get_num_threads() == 1


def test_a_fixed_thread_count_is_not_second_guessed(monkeypatch):
    assert kernel_choice.thread_candidates(3) == (3,)
    monkeypatch.setattr(kernel_choice, "_initial_threads", [4])  # torch's count when the process started
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert kernel_choice.thread_candidates() == (4,)
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(1)  # e.g. an earlier load chose 1: the candidates stay what the machine offers
    assert kernel_choice.thread_candidates() == (1, 4)
    with pytest.raises(CTCDrafterError):
        kernel_choice.thread_candidates(0)
