"""warp_probs samples as HF `generate` samples: the reference is `generate` itself, not a copy of its rules.

A tiny Llama runs `generate(do_sample=True, output_scores=True)` for one token with a logits processor
that replaces its logits by chosen ones; custom processors run before the sampling warpers, so the
returned scores are HF's warped version of exactly those logits. warp_probs must give the same
distribution for the whole [n, V] batch at once, including rows whose top-k or top-p boundary falls
inside a group of tied logits (which tied tokens survive is decided by HF's sort, not by us).
"""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import tiny_llama
from ctc_drafter.decoding.verify import warp_probs

V = 64


class _Replace(LogitsProcessor):
    """Hands `generate` fixed logits [n, V] in place of the model's."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, scores):
        return self.logits.clone()


def hf_generate_probs(logits, temperature, top_k, top_p):
    """logits [n, V] -> the distribution HF `generate` samples the next token from, per row."""
    model = tiny_llama(vocab_size=V, dtype=torch.float32)
    ids = torch.ones(logits.shape[0], 2, dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1,
                         temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=0,
                         logits_processor=LogitsProcessorList([_Replace(logits)]),
                         output_scores=True, return_dict_in_generate=True)
    return out.scores[0].softmax(-1)  # scores [n, V] after HF's warpers


def logits_with_ties():
    """[6, V] float32: random rows, and rows with a tied group straddling top-p 0.5 / the top-5 boundary."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(V, generator=g) * 3 for _ in range(3)]
    rest = torch.full((V - 5,), 0.1 / (V - 5))
    # 0.3 + one 0.15 < 0.5 < 0.3 + two: top-p 0.5 keeps two of the four tied tokens
    rows.append(torch.cat([torch.tensor([0.15, 0.3, 0.15, 0.15, 0.15]), rest]).log())
    # six equal tokens on top: top-k 5 keeps all six (HF keeps ties at the k-th value), top-p cuts among them
    rows.append(torch.cat([torch.full((6,), 1.0), torch.zeros(V - 6)]))
    rows.append(torch.zeros(V))  # all tied
    return torch.stack(rows)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.5), (0.5, 3, 1.0), (1.0, 10, 0.3), (2.0, 100, 0.95),
    (1.0, 0, 0.01), (1.0, 5, 0.5), (0.8, 1, 1.0),
])
def test_warp_probs_is_hf_generate_distribution(temperature, top_k, top_p):
    logits = logits_with_ties()
    expected = hf_generate_probs(logits, temperature, top_k, top_p)
    got = warp_probs(logits, temperature, top_k, top_p)  # all rows in one call
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert torch.equal(got > 0, expected > 0), "a different set of tokens survived the warpers"
    for row in range(logits.shape[0]):  # a single [V] row (the one-token pick) is warped the same way
        torch.testing.assert_close(warp_probs(logits[row], temperature, top_k, top_p), got[row], rtol=0, atol=0)


def test_ties_at_the_boundaries_are_exercised():
    """Guards the fixture: the tie rows really cut inside a tied group (else the test above proves less)."""
    logits = logits_with_ties()
    kept_p = (warp_probs(logits, 1.0, 0, 0.5) > 0).sum(-1)
    assert kept_p[3].item() == 3  # 0.3 and two of the four tied 0.15s
    kept_k = (warp_probs(logits, 1.0, 5, 1.0) > 0).sum(-1)
    assert kept_k[4].item() == 6 and kept_k[5].item() == V  # ties at the k-th value are all kept
