"""Hugging Face `generate` as an `eval` engine: the reference points of the benchmark table.

    hf                  model.generate(...) greedy (or sampled): HF's own vanilla loop
    hf-prompt-lookup    model.generate(..., prompt_lookup_num_tokens=K): HF's draft-free speculative
                        decoding, candidates copied from earlier n-grams of the prompt and the answer

`HFEngine.chat` answers like `CTCDrafter.chat` (same prompt ids, same EOS set, wall time of the whole
call including prefill, EOS kept in `tokens`), so `eval` and `report` treat both alike. `steps` is not
assumed but counted: a forward pre-hook on the model counts every base pass made during the call, and
a stopping criterion, which HF calls once per decoding iteration, records the sequence length after
each so that `accept_lengths` (tokens emitted per pass) can be checked against that count.
"""

from __future__ import annotations

import time

import torch

from ..decoding.generate import ChatMixin, GenerationResult, truncate_new_tokens
from ..decoding.verify import check_sampling
from ..errors import CTCDrafterError
from ..models.base import BaseModel

ENGINES = ("ours", "hf", "hf-prompt-lookup")
DEFAULT_PROMPT_LOOKUP_TOKENS = 10


def _length_recorder(lengths: list[int]):
    """A StoppingCriteria that never stops generation, only notes the sequence length at each iteration."""
    from transformers import StoppingCriteria

    class LengthRecorder(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            lengths.append(int(input_ids.shape[1]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return LengthRecorder()


class HFEngine(ChatMixin):
    """Answers through HF `generate` on the same loaded base model; `prompt_lookup_tokens` switches on lookup."""

    def __init__(self, base: BaseModel, prompt_lookup_tokens: int | None = None):
        if prompt_lookup_tokens is not None and prompt_lookup_tokens < 1:
            raise CTCDrafterError(f"--prompt-lookup-tokens must be >= 1, got {prompt_lookup_tokens}")
        self.base = base
        self.prompt_lookup_tokens = prompt_lookup_tokens

    @property
    def name(self) -> str:
        return "hf" if self.prompt_lookup_tokens is None else "hf-prompt-lookup"

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int):
        """Exactly the decoding rule `ours` uses, nothing from the checkpoint's generation_config.json.

        A checkpoint's defaults (repetition_penalty, top_k=50, sampling on, ...) would otherwise fill
        every unset field and make HF decode by a different rule than the runs it is compared with.
        """
        from transformers import GenerationConfig

        eos = sorted(self.base.eos_token_ids)
        pad = getattr(self.base.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = self.base.config.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        # greedy: sampling knobs left unset (HF warns about them otherwise; they are unused without do_sample)
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=temperature > 0, num_beams=1, **sampling,
            repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos or None, pad_token_id=pad,
            prompt_lookup_num_tokens=self.prompt_lookup_tokens, use_cache=True)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, **_ignored) -> GenerationResult:
        """One answer after `input_ids` (list of ids), timed like `CTCDrafter.generate` (prefill included)."""
        from transformers import GenerationConfig, StoppingCriteriaList

        if max_new_tokens < 1:
            raise CTCDrafterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        base, model = self.base, self.base.model
        prompt = torch.tensor([list(input_ids)], dtype=torch.long, device=base.device)  # [1,T]
        if prompt.shape[1] == 0:
            raise CTCDrafterError("empty prompt")
        if prompt.shape[1] >= base.max_length:
            raise CTCDrafterError(f"prompt is {prompt.shape[1]} tokens but the base model's context is {base.max_length}")
        limit = min(max_new_tokens, base.max_length - prompt.shape[1])
        config = self._generation_config(limit, temperature, top_p, top_k)
        if seed is not None:
            torch.manual_seed(seed)
        passes = []  # one entry per base forward call during this generate
        lengths = [prompt.shape[1]]
        hook = model.register_forward_pre_hook(lambda module, args: passes.append(1))
        saved_defaults, model.generation_config = model.generation_config, GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id)
        try:
            t0 = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                 stopping_criteria=StoppingCriteriaList([_length_recorder(lengths)]))
            tokens = out[0, prompt.shape[1]:].tolist()  # waits for the device: part of the timed call
            wall = time.perf_counter() - t0
        finally:
            hook.remove()
            model.generation_config = saved_defaults
        eos = base.eos_token_ids
        tokens = truncate_new_tokens(tokens, eos, limit)  # HF already stops there; a guard keeps `tokens` comparable
        end = prompt.shape[1] + len(tokens)
        accept = [min(b, end) - min(a, end) for a, b in zip(lengths, lengths[1:])]
        accept = [a for a in accept if a > 0]
        if sorted(lengths) != lengths or sum(accept) != len(tokens) or len(accept) != len(passes):
            # Some transformers versions (5.17's assisted generation) also run the stopping criteria on
            # candidate sequences, so the recorded lengths are not one per pass: report no per-step
            # split rather than a wrong one (idxs, from the forward hook, stays exact).
            accept = []
        return GenerationResult(
            tokens=tokens, steps=len(passes), accept_lengths=accept, wall_s=wall,
            stop_reason=("eos" if tokens and tokens[-1] in eos else
                         "length" if len(tokens) >= max_new_tokens else "context"))
