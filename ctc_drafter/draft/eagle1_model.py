"""The reference code's draft layout (CTC-drafter's `model/cnets.py`, which is EAGLE-1's): `"layout": "eagle1"`.

Data flow (d = base hidden size, V = base vocabulary):

    accepted position t:  fc(concat(emb(x_{t+1}) [d], h_t [d])) + bias   -- the embedding comes first
        -> decoder layer(s), causal, cached; layer 0 has no input RMSNorm (its input is fc's output)
        -> f_t [d] (no final norm), an estimate of the base's next hidden state h_{t+1}
        -> the base's own LM head (frozen, full vocabulary) -> logits [V]
    level j >= 1 (speculative, scratch KV past the accepted length):
        fc(concat(emb(top-1 token of level j-1), f_{t+j-1})) -> same layer(s) at position t+j -> level j

The CTC blank is token id 0 (the reference reuses Vicuna's <unk>), not a separate head: as frame rows
for the tree policies (blank last, decoding/proposers/frame_trees.py) token 0's logit moves to the
blank column. Each level is fed its own top-1 token over the whole vocabulary, blank included, as
`topK_genrate` does. The base's embedding and LM head are borrowed at `bind` and never saved.

Trained by training/reference_losses.py (`ctc-drafter train --preset reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .cache import DraftCache
from .config import DraftConfig
from .ar_model import ARDraftModel
from .model import CTCDraftModel, DecoderLayer

BLANK_TOKEN = 0  # the reference's `nn.CTCLoss(blank=0)`: a vocabulary token doubles as the blank


class Eagle1TrainOutput(NamedTuple):
    features: torch.Tensor  # [B,T,d] f_t, regresses the base's h_{t+1}
    logits: torch.Tensor  # [B,T,V] the base's LM head over f_t


class Eagle1DraftModel(CTCDraftModel):
    """fc + one decoder layer without its input norm, no final norm, the base's head: EAGLE-1's layout.

    Shares binding, save/load and the frozen-head helpers with CTCDraftModel; owns no frame layer,
    final norm, blank head or proposal vocabulary."""

    every_position = True  # trained on every position in one teacher-forced pass (training/reference_losses.py)

    def __init__(self, config: DraftConfig):
        # nn.Module's init, not CTCDraftModel's: that one would build the frame layer, final norm and
        # blank head this layout lacks (a layer's worth of memory at 7B, only to be deleted).
        nn.Module.__init__(self)
        config.validate()
        self.config = config
        d = config.hidden_size
        self.fuse = nn.Linear(2 * d, d, bias=True)  # the reference's `fc` (bias on)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_context_layers))
        self.layers[0].input_norm = nn.Identity()  # its input is fc's output, unnormalised (cnets.py index 0)
        self.rotary = None
        self.vocab_ids = None  # the whole vocabulary: symbol i is token i
        self._base = None
        self._bf16_head = None
        self._symbol_cache = None

    def init_weights(self, seed: int = 0) -> "Eagle1DraftModel":
        """PyTorch's default initialisation (what the reference trains from), from a seeded generator."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.RMSNorm)):
                    m.reset_parameters()
        return self

    # ---- pieces --------------------------------------------------------------------------------

    def _fuse(self, hidden, ids):
        """hidden [B,n,d] (base states or the draft's own features), ids [B,n] -> fc(concat(emb, hidden))."""
        w = self.fuse.weight.dtype
        return self.fuse(torch.cat([self._embed(ids).to(w), hidden.to(w)], -1))

    # The layer stack runs as the AR head's (layer 0's missing input norm lives in the layer itself).
    _layers = ARDraftModel._layers

    def frame_logits(self, f, fast: bool = False):
        """f [..., d] -> rows [..., V+1] for the tree policies (see `_rows`)."""
        return self._rows(self._proposal_head()(f) if fast else self._head(f))

    @staticmethod
    def _rows(tok):
        """Token logits [..., V] -> [..., V+1]: token 0's logit moved to the blank column (last), -inf in
        its own place, so the same distribution names the blank as the policies expect."""
        blank = tok[..., BLANK_TOKEN:BLANK_TOKEN + 1]
        tok = tok.index_fill(-1, torch.tensor([BLANK_TOKEN], device=tok.device), float("-inf"))
        return torch.cat([tok, blank], dim=-1)

    # ---- decoding ------------------------------------------------------------------------------

    # Accepted positions enter the cache as in the AR head: same fuse -> layers call, own _fuse/_layers.
    extend = ARDraftModel.extend

    @torch.no_grad()
    def levels(self, f_last, cache: DraftCache, n: int | None = None, min_path_prob: float = 0.0):
        """f_last [B,d] (feature of position t = cache.length-1) -> level log-probs [B,n,V+1] (float32).

        `topK_genrate`: level j+1 is fed level j's top-1 token over the whole vocabulary (token 0, the
        blank, included) and level j's own feature, at position t+j; its keys go to scratch rows past
        the accepted length, overwritten by the next `extend`. Every level is drafted (min_path_prob is
        accepted for the proposer's interface and ignored: the reference has no cut-off)."""
        n = self.config.num_frames if n is None else n
        B = f_last.shape[0]
        f = f_last[:, None]  # [B,1,d]
        rows = []
        for j in range(n):
            if j:
                pos = cache.length - 1 + j
                positions = torch.full((B, 1), pos, device=f.device)
                f = self._layers(self._fuse(f, tok), positions, cache, pos, None)  # sees rows 0..pos
            logits = self._proposal_head()(f)  # [B,1,V]
            rows.append(torch.log_softmax(self._rows(logits).float(), dim=-1))
            tok = logits.argmax(-1)  # [B,1] the top-1 token, blank (0) included: the next level's input
        return torch.cat(rows, 1)

    def frames(self, s_last, cache: DraftCache):
        """For callers that ask any draft for its frames: the levels."""
        return self.levels(s_last, cache)

    # ---- training ------------------------------------------------------------------------------

    def forward(self, hidden, next_ids) -> Eagle1TrainOutput:
        """Teacher-forced pass over whole sequences: hidden [B,T,d] (h_t), next_ids [B,T] (x_{t+1}).

        Causal attention only: sequences are right-padded, so no real position sees padding."""
        B, T, _ = hidden.shape
        pos = torch.arange(T, device=hidden.device).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()[None, None]
        f = self._layers(self._fuse(hidden, next_ids), pos, None, 0, causal)
        return Eagle1TrainOutput(f, self._head(f))


def new_eagle1_draft_for(base, seed: int = 0, **overrides) -> Eagle1DraftModel:
    """A freshly initialised eagle1-layout draft shaped for `base` (a BaseModel)."""
    cfg = DraftConfig.from_base_config(base.config, base_model=base.name,
                                       **{**overrides, "architecture": "ar", "layout": "eagle1"})
    return Eagle1DraftModel(cfg).init_weights(seed).to(device=base.device, dtype=base.dtype).bind(base.model)
