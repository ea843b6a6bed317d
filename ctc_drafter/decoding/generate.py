"""Generation: vanilla decoding and CTC speculative decoding through one API.

    prefill            prompt -> base KV cache, first token
    decode_one_token   vanilla step: 1 token in, 1 token out
    speculative_step   proposer's token tree (checked: tree.py check_tree) -> one base pass over the tree (4D mask)
                       -> accept the longest matching path + the base's bonus token -> compact KV

The request's tokens and accepted hidden states live in one DecodeState (state.py), which proposers
read from their own cursors. Shapes are for batch 1, the setting of the paper and of interactive use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..draft.model import CTCDraftModel
from ..errors import CTCDrafterError
from ..models.base import BaseModel
from ..models.cpu_kernels import PackedLinear
from .proposers import DEFAULT_PROPOSER, Proposer, default_budget, default_generator, make_proposer, proposer_kind
from .proposers.base import is_cheap, modes_of
from .state import DecodeState
from .switch import PLAIN, SpeculationSwitch
from .tree import TokenTree, TreeError, check_tree
from ..models.kv_cache import compact_kv, new_kv_cache
from .verify import accept_greedy, accept_sampling, check_sampling, warp_probs


MAX_BUDGET = 512  # tree nodes per pass: the mask is nodes x (past + nodes); Medusa's tree has 64


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    steps: int  # base forward passes, prefill included (vanilla: one per token)
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted by each of those passes
    wall_s: float = 0.0
    prefill_s: float = 0.0
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per speculative step
    arm_steps: dict[str, int] = field(default_factory=dict)  # steps per arm the switch chose (decoding/switch.py)
    text: str | None = None
    stop_reason: str = ""  # eos | length | context | stop

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def mean_accept_length(self) -> float:
        """beta: tokens per base forward pass (1.0 for vanilla decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def plain_steps(self) -> int:
        """Steps of a speculative request that the switch ran as plain 1-token steps."""
        return self.arm_steps.get(PLAIN, 0)

    def arms_label(self) -> str:
        """'' or e.g. 'steps: full 30, cheap 12, plain 5' (how the switch took the steps)."""
        return "steps: " + ", ".join(f"{a} {n}" for a, n in self.arm_steps.items()) if self.arm_steps else ""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accept_length": round(self.mean_accept_length, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "wall_s": round(self.wall_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "accept_lengths": self.accept_lengths,
            "mean_tree_size": round(sum(self.tree_sizes) / len(self.tree_sizes), 2) if self.tree_sizes else 0,
            "arm_steps": self.arm_steps,
            "stop_reason": self.stop_reason,
            "tokens": self.tokens,
        }


class TokenPicker:
    """Chooses one token from logits: argmax, or a sample from the warped distribution."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None):
        check_sampling(temperature, top_k, top_p)
        self.greedy = temperature == 0
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.gen = torch.Generator().manual_seed(self.seed)  # host draws (acceptance walk)
        self._device_gens: dict[torch.device, torch.Generator] = {}

    def device_gen(self, device: torch.device) -> torch.Generator:
        """A generator where the logits live, so sampling a token never copies a vocabulary row to the host."""
        if device.type == "cpu":
            return self.gen
        if device not in self._device_gens:
            self._device_gens[device] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._device_gens[device]

    def probs(self, logits):
        return warp_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits) -> int:  # logits [V]
        if self.greedy:
            return int(logits.argmax().item())
        return int(torch.multinomial(self.probs(logits), 1, generator=self.device_gen(logits.device)).item())

    def accept(self, tree: TokenTree, logits):  # logits [n,V]
        if self.greedy:
            return accept_greedy(tree, logits)
        return accept_sampling(tree, self.probs(logits), self.gen, self.device_gen(logits.device))


class ChatMixin:
    """Prompt templating and decoding shared by every engine that has `.base` and `.generate`."""

    def chat(self, messages, template: str = "auto", **kw) -> GenerationResult:
        """Generate a reply to a prompt string or a list of {role, content} messages."""
        from ..models.templates import build_prompt_ids

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = build_prompt_ids(self.base.tokenizer, messages, template)
        res = self.generate(ids, **kw)
        res.text = self.decode(res.tokens)
        return res

    def decode(self, tokens: list[int]) -> str:
        eos = self.base.eos_token_ids
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        return self.base.tokenizer.decode(tokens, skip_special_tokens=True)


class SpeculativeDecoder(ChatMixin):
    """A frozen base model plus a proposer (the CTC draft, n-gram lookup, both, or a plugin); `generate` is
    lossless with respect to the base whatever the proposer suggests (every tree is checked against the
    proposer contract, decoding/tree.py `check_tree`)."""

    def __init__(self, base: BaseModel, draft: CTCDraftModel | None = None, tree_policy: str | None = None,
                 budget: int | None = None, draft_trained: bool = True, proposer: str | Proposer = DEFAULT_PROPOSER,
                 cost_ms=None, adaptive: bool = True, switch=SpeculationSwitch, clock=time.perf_counter,
                 generator: str | None = None, ctc_transform: bool | None = None):
        """proposer: a Proposer, a name (ctc, ngram, hybrid) or a plugin 'package.module:Class'.
        tree_policy: the CTC draft's (beam, medusa, prefix; None: the device's default); `generator` is its
        old name. switch: arms -> an object with choose() and record(arm, tokens, seconds), made per greedy
        request to choose how each step is taken (decoding/switch.py); clock: seconds, for the switch's
        step timings and the result's wall times. ctc_transform: the draft's trees with the CTC rule
        (merge repeats, drop blanks) or taken literally; None: as the draft was trained."""
        tree_policy = _policy_alias(tree_policy, generator)
        self.base = base
        self.adaptive = adaptive  # greedy requests take each step the way measured fastest (decoding/switch.py)
        self.switch, self.clock = switch, clock
        self.kernel_report = None  # set by from_pretrained: the CPU kernel choice and pass cost model
        self.draft = None if draft is None else draft if draft.bound_to(base.model) else draft.bind(base.model)
        # an eagle3 draft reads several base layers: the base's passes then return those, not the last state
        eagle3 = self.draft is not None and self.draft.config.layout == "eagle3"
        base.hidden_layers = list(self.draft.config.aux_layers) if eagle3 else None
        self.draft_trained = draft_trained
        self.vocab_size = int(base.config.vocab_size)
        if isinstance(proposer, Proposer):
            self.proposer = proposer
        else:
            kind = proposer_kind(proposer)
            self.proposer = make_proposer(proposer, self.draft, tree_policy, cost_ms=cost_ms,
                                          ctc_transform=ctc_transform) if (
                self.draft is not None or not kind.needs_draft) else None
        name = getattr(self.proposer, "name", "ctc")
        policy = tree_policy or default_generator(base.device, self.draft)  # an eagle1 draft's is medusa
        self.budget = budget if budget is not None else default_budget(base.device, name, policy,
                                                                       sized=cost_ms is not None)
        if not 1 <= self.budget <= MAX_BUDGET:
            raise CTCDrafterError(f"node budget must be in 1..{MAX_BUDGET}, got {self.budget}")

    def settings(self) -> dict:
        """What identifies this engine's speculation in answer files and --json output."""
        if self.proposer is None:
            return {"proposer": None, "budget": None}
        return {**self.proposer.describe(), "budget": self.budget, "adaptive": self.adaptive}

    def label(self) -> str:
        """One line for logs and closing lines: what proposes, with which policy, under which budget."""
        s = self.settings()
        gen = f" {s['generator']}" if s.get("generator") else ""
        return f"speculative ({s['proposer']}{gen}, budget {s['budget']})"

    @property
    def kernels(self) -> str:
        """The base's CPU linear kernels: 'stock', 'packed', or a plan by pass size such as 'stock<=1,packed'."""
        if self.kernel_report is not None:
            return self.kernel_report.label
        return "packed" if any(isinstance(m, PackedLinear) for m in self.base.model.modules()) else "stock"

    @classmethod
    def from_pretrained(cls, base_model: str = "default", draft_model: str | None = "default", device="auto",
                        dtype="auto", tree_policy: str | None = None, budget: int | None = None,
                        cpu_kernels: str = "auto", proposer: str | Proposer = DEFAULT_PROPOSER,
                        trust_remote_code: bool = False, cpu_threads: int | str = "auto",
                        adaptive: bool = True, switch=SpeculationSwitch,
                        generator: str | None = None, ctc_transform: bool | None = None,
                        backend: str = "torch", context: int | None = None) -> "SpeculativeDecoder":
        """Load base and draft (the draft only where the proposer takes one).

        cpu_kernels (CPU fp32/bf16 bases): 'auto' gives each pass size the linear kernel measured
        fastest on this machine (timed at first load, cached; models/kernel_choice.py), 'packed' /
        'stock' force oneDNN packed weights / PyTorch's own. The same timings are the pass cost model
        with which the hybrid proposer sizes each step's tree (`kernel_report.cost`). cpu_threads: torch's
        thread count, 'auto' = 1 or all cores, whichever the same timing found faster (unless
        OMP_NUM_THREADS fixes it), or a number. adaptive: greedy requests take each step the way measured
        fastest on the request (the proposer's modes, plain steps; decoding/switch.py); False asks the
        whole proposer on every step. ctc_transform: see __init__. backend: 'torch' (the HF model, eager) or
        a compiled static engine on a CPU ('compiled-int4', 'compiled-int8', 'compiled-bf16';
        models/compiled_base.py: lossless with respect to that engine's own greedy) of `context` rows.
        """
        from ..draft import load_draft
        from ..models.base import load_base_model
        from ..models.compiled_base import BACKENDS, DEFAULT_CONTEXT, TORCH, compile_base, static_engine_report
        from ..models.kernel_choice import apply_cpu_kernels

        tree_policy = _policy_alias(tree_policy, generator)
        kind = None if isinstance(proposer, Proposer) else proposer_kind(proposer)  # a bad name fails before loading
        if backend not in BACKENDS:
            raise CTCDrafterError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
        base = load_base_model(base_model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if backend == TORCH:
            kernels = apply_cpu_kernels(base, cpu_kernels, threads=cpu_threads)
        else:  # the engine's own kernels; its trees are sized by the budget, not by a measured cost
            base = compile_base(base, backend, context=context or DEFAULT_CONTEXT)
            kernels = static_engine_report(backend, cpu_threads)
        if kind is not None and not kind.takes_draft:
            draft_model = None  # n-gram lookup (or a plugin without `draft`) needs no draft
        draft, trained = (None, True) if draft_model is None else load_draft(draft_model, base)
        sized = kernels.cost is not None and kind is not None and kind.sized_by_cost
        drafter = cls(base, draft, tree_policy=tree_policy, budget=budget, draft_trained=trained, proposer=proposer,
                      cost_ms=kernels.cost.pass_ms if sized else None, adaptive=adaptive, switch=switch,
                      ctc_transform=ctc_transform)
        drafter.kernel_report = kernels
        if backend != TORCH:  # compile the pass sizes this engine will run now, not in its first requests
            base.warm(drafter.budget if drafter.proposer is not None else 1)
        return drafter

    def arms(self) -> tuple[str, ...]:
        """The ways the speculation switch may take a step: the proposer's modes, plus plain 1-token steps
        unless a mode costs next to nothing (n-gram lookup proposes a root-only tree where it finds
        nothing, which is run as a plain step: a separate plain arm would only take its matches away)."""
        modes = modes_of(self.proposer)
        return modes if is_cheap(self.proposer) or "cheap" in modes else modes + (PLAIN,)

    # ---- the steps -----------------------------------------------------------------------------

    def prefill(self, prompt: torch.Tensor, cache):
        """prompt [1,T] -> hidden [1,T,d], logits of the last position [1,V]."""
        hidden, logits = self.base.forward(prompt, cache, logits_at=slice(-1, None))
        return hidden, logits[:, -1]

    def decode_one_token(self, token: int, cache):
        """One vanilla step: feed `token`, get logits for the next one [V] and the base's hidden state
        at `token` [1,1,d]."""
        ids = torch.tensor([[token]], device=self.base.device)
        hidden, logits = self.base.forward(ids, cache)
        return logits[0, -1], hidden

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        """The proposer's tree under the newest token, checked against the contract (TreeError naming the
        proposer: a malformed tree is never verified)."""
        root, who = state.root, proposer_label(self.proposer)  # root read first: the state is the loop's
        try:
            tree = self.proposer.propose(state, max_depth, self.budget)
        except TreeError as e:  # a TokenTree it built was malformed
            raise TreeError(f"proposer {who} broke the tree contract: {e}") from None
        check_tree(tree, root, self.budget, max_depth, self.vocab_size, who)
        return tree

    def speculative_step(self, state: DecodeState, cache, picker: TokenPicker, max_depth: int):
        """Propose a tree under the newest token, verify it in one base pass, accept.

        Returns (new tokens, base hidden states at the accepted path [1,m,d], nodes verified).
        """
        root, past = state.root, cache.get_seq_length()
        tree = self.propose(state, max_depth) if max_depth > 0 else TokenTree([root], [-1])
        if len(tree) == 1:  # nothing proposed (no n-gram match): a plain step, without tree mask or compaction
            logits, hidden = self.decode_one_token(root, cache)
            new = [picker.pick(logits)]
            self.proposer.feedback(tree, new)
            return new, hidden, 1
        ids, pos, mask = tree.verify_inputs(past, self.base.device, self.base.dtype)
        hidden, logits = self.base.forward(ids, cache, position_ids=pos, attention_mask=mask)  # [1,n,d], [1,n,V]
        path, bonus = picker.accept(tree, logits[0])
        compact_kv(cache, past, path)
        new = [tree.tokens[i] for i in path[1:]] + [bonus]
        self.proposer.feedback(tree, new)
        return new, hidden[:, path], len(tree)

    # ---- the loops -----------------------------------------------------------------------------

    def _check_prompt(self, input_ids) -> torch.Tensor:
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
            if ids.shape[0] != 1:
                raise CTCDrafterError("batch size must be 1")
        else:
            ids = torch.tensor([list(input_ids)], dtype=torch.long)
        if ids.shape[1] == 0:
            raise CTCDrafterError("empty prompt")
        if ids.shape[1] >= self.base.max_length:
            raise CTCDrafterError(
                f"prompt is {ids.shape[1]} tokens but the base model's context is {self.base.max_length}")
        return ids.to(self.base.device)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, streamer=None, speculative: bool = True, seed: int | None = None,
                 should_stop=None) -> GenerationResult:
        """Generate up to `max_new_tokens` after `input_ids` (list or [1,T] tensor).

        speculative=False runs the vanilla loop through the same code (the baseline). Stops at EOS
        (included in the output, as HF `generate` does), at max_new_tokens, or at the context limit.
        should_stop(tokens) -> bool is called with all new tokens after every step (and after the
        prefill); True ends generation there with stop_reason "stop" (stop strings, a cancelled client).
        Greedy speculation takes each step the way measured fastest on this request (the engine's
        `adaptive` and `switch`; decoding/switch.py): the tokens are the same, only the speed differs.
        Sampling asks the whole proposer on every step, so that a seed gives the same text whatever the
        machine's timing.
        """
        if max_new_tokens < 1:
            raise CTCDrafterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if speculative and self.proposer is None:
            raise CTCDrafterError("speculative decoding needs a draft model (or proposer='ngram')")
        prompt = self._check_prompt(input_ids)
        picker = TokenPicker(temperature, top_k, top_p, seed)
        eos = self.base.eos_token_ids
        if streamer is not None:
            streamer.put(prompt.cpu())
        t0 = self.clock()
        cache = new_kv_cache(self.base)
        hidden, logits = self.prefill(prompt, cache)
        token = picker.pick(logits[0])
        res = GenerationResult(tokens=[], steps=1, accept_lengths=[1], prefill_s=self.clock() - t0)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        limit = min(max_new_tokens, self.base.max_length - prompt.shape[1])
        state = DecodeState(prompt[0].tolist(), token, hidden)
        arms = self.arms() if speculative and self.adaptive and picker.greedy else ()
        switch = self.switch(arms) if len(arms) > 1 else None
        if speculative:
            self.proposer.start(state)
        mode = "full"
        stop = self._stop_reason(state, eos, limit, max_new_tokens, should_stop)
        while not stop:
            remaining, t_step = limit - state.num_new, self.clock()
            arm = switch.choose() if switch is not None else mode
            if speculative and arm != PLAIN:
                if arm != mode:
                    self.proposer.set_mode(arm)
                    mode = arm
                new, path_hidden, n = self.speculative_step(state, cache, picker, max_depth=remaining - 1)
                res.tree_sizes.append(n)
            else:
                logits, path_hidden = self.decode_one_token(state.root, cache)
                new = [picker.pick(logits)]
            new = truncate_new_tokens(new, eos, remaining)
            state.append(new, path_hidden[:, :len(new)])
            res.steps += 1
            res.accept_lengths.append(len(new))
            if streamer is not None:
                streamer.put(torch.tensor(new))
            if switch is not None:
                switch.record(arm, len(new), self.clock() - t_step)
                res.arm_steps[arm] = res.arm_steps.get(arm, 0) + 1
            stop = self._stop_reason(state, eos, limit, max_new_tokens, should_stop)
        if speculative:
            self.proposer.finish(state)
        if streamer is not None:
            streamer.end()
        res.wall_s = self.clock() - t0
        res.tokens, res.stop_reason = state.new_tokens, stop
        return res

    @staticmethod
    def _stop_reason(state: DecodeState, eos: set[int], limit: int, max_new_tokens: int, should_stop=None) -> str:
        """'' while generation goes on, else why it ends: eos, length, context (the base's limit) or stop."""
        if state.root in eos:
            return "eos"
        if state.num_new >= limit:
            return "length" if state.num_new >= max_new_tokens else "context"
        if should_stop is not None and should_stop(state.new_tokens):
            return "stop"
        return ""


CTCDrafter = SpeculativeDecoder  # the first name: it also runs n-gram lookup and plugins, with no draft


def _policy_alias(tree_policy: str | None, generator: str | None) -> str | None:
    """`generator` is the tree policy's old keyword; both may be given only if they agree."""
    if generator is not None and tree_policy is not None and generator != tree_policy:
        raise CTCDrafterError(f"tree_policy={tree_policy!r} and generator={generator!r} disagree (generator is "
                              "tree_policy's old name: give one)")
    return tree_policy if tree_policy is not None else generator


def proposer_label(proposer) -> str:
    """How errors name a proposer: its name and class."""
    cls = type(proposer)
    return f"{getattr(proposer, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


def truncate_new_tokens(new: list[int], eos: set[int], remaining: int) -> list[int]:
    new = new[:remaining]
    for i, t in enumerate(new):
        if t in eos:
            return new[: i + 1]
    return new
