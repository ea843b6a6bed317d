"""The proposer seam: every tree is checked against the contract before the base verifies it (a breach
is one error naming the proposer and the rule), and proposers written outside the package plug in by
name (`package.module:Class`) in the Python API and every command, staying lossless."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter import CTCDrafter, Proposer, SpeculativeDecoder, TokenTree
from ctc_drafter.cli.main import main
from ctc_drafter.decoding import DecodeState, TreeError, make_proposer
from ctc_drafter.decoding.proposers import load_plugin
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import BaseModel
from test_exactness import hf_greedy

DATA = Path(__file__).parent / "data"


# ---- the contract ------------------------------------------------------------------------------

def test_a_tree_listing_a_child_before_its_parent_is_refused_at_construction():
    with pytest.raises(TreeError, match="node 1's parent is 2: each parent must be an earlier node"):
        TokenTree([9, 1, 2], [-1, 2, 0])
    tree = TokenTree([9, 1, 2, 3], [-1, 0, 0, 1])
    assert tree.depths == [0, 1, 1, 2] and tree.children == [[1, 2], [3], [], []]


def malformed(case, root, max_depth, budget):
    """A tree that breaks one rule of the contract (or something that is not a tree)."""
    if case == "root":
        return TokenTree([(root + 1) % 64, 5], [-1, 0])
    if case == "budget":
        return TokenTree([root] + list(range(budget)), [-1] + [0] * budget)  # depth 1, budget + 1 nodes
    if case == "depth":
        return TokenTree([root] + [7] * (max_depth + 1), list(range(-1, max_depth + 1)))
    if case == "child_first":
        return TokenTree([root, 5, 6], [-1, 2, 0])
    if case == "root_parent":
        return TokenTree([root, 5], [0, 0])
    if case == "parent_range":
        return TokenTree([root, 5], [-1, 7])
    if case == "lengths":
        return TokenTree([root, 5, 6], [-1, 0])
    if case == "scores":
        return TokenTree([root, 5], [-1, 0], scores=[1.0])
    if case == "vocab":
        return TokenTree([root, 64], [-1, 0])
    if case == "negative":
        return TokenTree([root, -3], [-1, 0])
    if case == "siblings":
        return TokenTree([root, 5, 5], [-1, 0, 0])
    if case == "changed_after":
        tree = TokenTree([root, 5], [-1, 0])
        tree.tokens.append(6)  # lists edited after construction: checked again by the loop
        return tree
    if case == "not_a_tree":
        return [root, 5]
    raise AssertionError(case)


RULES = {
    "root": r"rooted at token \d+, not at the newest token \d+",
    "budget": r"5 nodes, over the budget of 4",
    "depth": r"depth 2, over the max_depth of 1",
    "child_first": r"node 1's parent is 2: each parent must be an earlier node",
    "root_parent": r"node 0 is the root: its parent must be -1, not 0",
    "parent_range": r"node 1's parent is 7",
    "lengths": r"different lengths \(3, 2, 3\)",
    "scores": r"different lengths \(2, 2, 1\)",
    "vocab": r"node 1's token 64 is not an id of the base's vocabulary \(0..63\)",
    "negative": r"node 1's token -3 is not an id",
    "siblings": r"node 2 repeats a sibling's token 5",
    "changed_after": r"different lengths \(3, 2, 2\)",
    "not_a_tree": r"propose returned a list, not a TokenTree",
}


class Malformed(Proposer):
    def __init__(self, case):
        self.case, self.name = case, f"bad-{case}"

    def propose(self, state, max_depth, budget):
        return malformed(self.case, state.root, max_depth, budget)


@pytest.mark.parametrize("case", list(RULES))
def test_each_breach_of_the_contract_is_refused_naming_the_proposer_and_the_rule(toy_base, case, first_arm):
    drafter = SpeculativeDecoder(toy_base, proposer=Malformed(case), budget=4, switch=first_arm)
    # 3 new tokens: the first step may go 2 deep (the first token is the prefill's), so max_depth is 1
    with pytest.raises(CTCDrafterError) as e:
        drafter.generate([1, 2, 3], max_new_tokens=3)
    msg = str(e.value)
    assert f"proposer 'bad-{case}' (test_contract.Malformed) broke the tree contract: " in msg
    assert re.search(RULES[case], msg), msg
    assert "\n" not in msg


class Bigram(Proposer):
    """A proposer as an outside author writes it: an online bigram table, kept by reading the decode state
    from its cursor; proposes the root's two most frequent followers, each extended along the most frequent."""

    name = "bigram"

    def start(self, state):
        self.follow, self.last = {}, None
        self.read(state)

    def read(self, state):
        for t in state.read_tokens(self):
            if self.last is not None:
                counts = self.follow.setdefault(self.last, {})
                counts[t] = counts.get(t, 0) + 1
            self.last = t

    def best(self, token, k):
        counts = self.follow.get(token, {})
        return sorted(counts, key=lambda t: (-counts[t], t))[:k]

    def propose(self, state, max_depth, budget):
        self.read(state)
        tokens, parents = [state.root], [-1]
        for token in self.best(state.root, 2):  # two different children of the root, each extended as a chain
            node = 0
            for _ in range(max_depth):
                if len(tokens) >= budget:
                    break
                tokens.append(token)
                parents.append(node)
                node = len(tokens) - 1
                nxt = self.best(token, 1)
                if not nxt:
                    break
                token = nxt[0]
        return TokenTree(tokens, parents)


def test_a_well_formed_outside_proposer_stays_identical_to_hf_generate(first_arm):
    model = tiny_llama(dtype=torch.float64, seed=5)
    base = BaseModel(model, None, "toy")
    drafter = SpeculativeDecoder(base, proposer=Bigram(), budget=6, switch=first_arm)
    longest = 1
    for ids in ([[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1, 5]], [[7, 7, 2, 7, 7, 2, 7]]):
        ids = torch.tensor(ids)
        spec = drafter.generate(ids, max_new_tokens=40)
        assert spec.tokens == hf_greedy(model, ids, 40)
        longest = max(longest, *spec.accept_lengths)
    assert longest > 2, "no step accepted two draft tokens: the multi-token path is untested"


# ---- the decode state ---------------------------------------------------------------------------

def test_decode_state_gives_each_reader_what_it_has_not_read():
    h = torch.arange(3 * 2, dtype=torch.float64).reshape(1, 3, 2)  # hidden states over a 3-token prompt
    state = DecodeState([10, 11, 12], 13, h)
    a, b = object(), object()
    assert state.read_tokens(a) == [10, 11, 12, 13] and state.root == 13
    hid, nxt = state.read_hidden(a)
    assert torch.equal(hid, h) and nxt == [11, 12, 13]  # the token after each position
    state.append([14, 15], h[:, :2] + 100)  # a step: 2 tokens, hidden states at the old root and node 1
    state.append([16], h[:, :1] + 200)
    assert state.read_tokens(a) == [14, 15, 16] and state.read_tokens(a) == []
    hid, nxt = state.read_hidden(a)
    assert nxt == [14, 15, 16] and torch.equal(hid, torch.cat([h[:, :2] + 100, h[:, :1] + 200], 1))
    assert state.read_hidden(a) == (None, [])
    assert state.read_tokens(b) == [10, 11, 12, 13, 14, 15, 16]  # another reader, its own cursor
    assert torch.equal(state.read_hidden(b)[0], state.hidden(0)) and state.hidden_len == len(state.tokens) - 1
    assert state.new_tokens == [13, 14, 15, 16] and state.num_new == 4


# ---- plugins ------------------------------------------------------------------------------------

def readme_block(heading: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```python\n") + 10: section.index("\n```", section.index("```python"))] + "\n"


def test_readme_plugin_example_is_the_module_the_tests_run():
    assert readme_block("## Plugging in a proposer") == (DATA / "repeat_proposer.py").read_text()


@pytest.mark.slow
def test_readme_plugin_example_runs_as_a_script_on_the_embedded_default():
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(DATA)])}
    out = subprocess.run([sys.executable, str(DATA / "repeat_proposer.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]


@pytest.fixture
def plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(str(DATA))
    yield
    sys.modules.pop("repeat_proposer", None)


def test_a_plugin_loads_by_name_in_the_python_api(plugin_path, toy_base, first_arm):
    p = make_proposer("repeat_proposer:RepeatLast")
    assert type(p).__name__ == "RepeatLast" and p.name == "repeat"
    model = tiny_llama(dtype=torch.float64, seed=7)
    with torch.no_grad():  # make repeats likely: the model copies its input token
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * 20)
    base = BaseModel(model, None, "toy")
    drafter = SpeculativeDecoder(base, proposer="repeat_proposer:RepeatLast", budget=4, switch=first_arm)
    ids = torch.tensor([[5, 5, 5, 2]])
    spec = drafter.generate(ids, max_new_tokens=20)
    assert spec.tokens == hf_greedy(model, ids, 20) and spec.steps < 20
    assert drafter.settings()["proposer"] == "repeat"


def test_a_plugin_taking_draft_gets_the_loaded_draft_and_bad_plugins_are_one_line(tmp_path, monkeypatch, toy_base):
    (tmp_path / "my_plugins.py").write_text(
        "from ctc_drafter import Proposer, TokenTree\n"
        "class WithDraft(Proposer):\n"
        "    def __init__(self, draft):\n"
        "        self.draft = draft\n"
        "    def propose(self, state, max_depth, budget):\n"
        "        return TokenTree([state.root], [-1])\n"
        "class NotOne:\n"
        "    pass\n"
        "class NeedsMore(Proposer):\n"
        "    def __init__(self, size):\n"
        "        pass\n"
        "    def propose(self, state, max_depth, budget):\n"
        "        return TokenTree([state.root], [-1])\n")
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from ctc_drafter.draft import new_draft_for

    draft = new_draft_for(toy_base, seed=0)
    p = make_proposer("my_plugins:WithDraft", draft=draft)
    assert p.draft is draft and p.name == "my_plugins:WithDraft"  # unnamed: named by its spec
    assert make_proposer("my_plugins:WithDraft").draft is None  # no draft loaded: draft=None
    errors = {
        "no_such_module_xyz:Foo": "no module named 'no_such_module_xyz' on the Python path",
        "my_plugins:Missing": "module my_plugins has no 'Missing'",
        "my_plugins:NotOne": "NotOne is not a subclass of ctc_drafter.decoding.Proposer",
        "my_plugins:NeedsMore": "cannot construct it with no arguments",
        "broken_plugin:X": "importing broken_plugin failed: No module named 'no_such_dependency_xyz'",
        "nonsense": "unknown proposer 'nonsense' (use ctc, ngram, hybrid, or package.module:Class)",
        "my_plugins:": "write it as package.module:Class",
    }
    for spec, msg in errors.items():
        with pytest.raises(CTCDrafterError, match=re.escape(msg)):
            make_proposer(spec)
    with pytest.raises(CTCDrafterError):
        load_plugin("my_plugins:NotOne")
    sys.modules.pop("my_plugins", None)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_plugin_through_generate_and_eval_is_lossless_against_baseline(plugin_path, tiny_model_dir, tmp_path, capsys):
    common = ["--base-model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "12"]
    gen = ["generate", *common, "--prompt", "Say hello hello hello.", "--json"]
    code, out, _ = run_cli(capsys, *gen, "--proposer", "repeat_proposer:RepeatLast", "--draft-model", "no-such-draft")
    assert code == 0  # the plugin takes no draft: none is loaded (the named folder does not exist)
    spec = json.loads(out)
    code, out, _ = run_cli(capsys, *gen, "--baseline")
    base = json.loads(out)
    assert code == 0 and spec["proposer"] == "repeat" and spec["speculative"] is True
    assert spec["text"] == base["text"] and spec["new_tokens"] == base["new_tokens"]
    answers = {}
    for mode in ("plugin", "baseline"):
        flags = ["--proposer", "repeat_proposer:RepeatLast"] if mode == "plugin" else ["--baseline"]
        assert main(["eval", "--bench", "gsm8k", "--question-file", str(DATA / "gsm8k_test_head20.jsonl"),
                     "--question-end", "2", "--model-id", mode, "--answer-dir", str(tmp_path), "--no-progress",
                     *common, *flags]) == 0
        answers[mode] = [json.loads(x) for x in open(tmp_path / f"{mode}.jsonl")]
    capsys.readouterr()
    assert [a["choices"][0]["tokens"] for a in answers["plugin"]] == [a["choices"][0]["tokens"] for a in
                                                                     answers["baseline"]]
    assert answers["plugin"][0]["meta"]["proposer"] == "repeat" and answers["plugin"][0]["meta"]["speculative"]


def test_a_bad_proposer_option_is_one_line_and_exit_2(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "generate", "--base-model", str(tiny_model_dir), "--prompt", "hi",
                           "--proposer", "no_such_module_xyz:Foo")
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ctc-drafter: error:")]
    assert len(lines) == 1 and "no module named 'no_such_module_xyz'" in lines[0]


# ---- names --------------------------------------------------------------------------------------

def test_names_and_defaults(toy_base):
    from ctc_drafter.decoding.proposers import DEFAULT_PROPOSER
    from ctc_drafter.draft import new_draft_for

    assert CTCDrafter is SpeculativeDecoder
    draft = new_draft_for(toy_base, seed=0)  # bound to the base by new_draft_for
    assert draft.bound_to(toy_base.model)
    bind = draft.bind
    draft.bind = lambda lm: pytest.fail("a draft already bound to this base was bound again")
    d = SpeculativeDecoder(toy_base, draft, tree_policy="medusa")
    assert d.settings()["proposer"] == DEFAULT_PROPOSER and d.settings()["generator"] == "medusa"
    draft.bind = bind
    assert SpeculativeDecoder(toy_base, draft, generator="beam", proposer="ctc").settings()["generator"] == "beam"
    with pytest.raises(CTCDrafterError, match="disagree"):
        SpeculativeDecoder(toy_base, draft, tree_policy="beam", generator="prefix")


def test_evaluation_exports_the_hf_engine_and_the_answer_meta_builder(toy_base, tmp_path):
    from ctc_drafter.evaluation import HFEngine, answer_meta
    from ctc_drafter.evaluation.hf_engine import HFEngine as defined

    assert HFEngine is defined
    q = tmp_path / "q.jsonl"
    from ctc_drafter.draft import new_draft_for

    ours = answer_meta(SpeculativeDecoder(toy_base, new_draft_for(toy_base), proposer="ctc", budget=8), "gsm8k", q,
                       draft_model="x")
    assert ours["proposer"] == "ctc" and ours["budget"] == 8 and ours["speculative"] is True
    assert ours["draft_model"] == "x" and ours["question_file"] == str(q.resolve()) and ours["engine"] == "ours"
    ngram = answer_meta(SpeculativeDecoder(toy_base, proposer="ngram"), "gsm8k", q, draft_model="default")
    assert ngram["proposer"] == "ngram" and ngram["draft_model"] is None and ngram["draft_trained"] is None
    base = answer_meta(SpeculativeDecoder(toy_base), "gsm8k", q, speculative=False)
    assert base["proposer"] is None and base["budget"] is None and base["speculative"] is False
    hf = answer_meta(HFEngine(toy_base), "mt_bench", q, engine_kind="hf")
    assert hf["engine"] == "hf" and hf["speculative"] is False and hf["kernels"] == "stock"
