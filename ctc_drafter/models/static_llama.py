"""A Llama base as gpt-fast runs it: a static KV cache, one compiled graph per pass size, weight-only int8/int4.

What the per-pass cost curves (scripts/pass_cost.py, issue 33) time as "our PyTorch path compiled": the
HF model's weights in gpt-fast's layout (q/k/v and gate/up fused), each layer's keys/values in a
preallocated [1, Hkv, max_len, hd] buffer written at `input_pos`, attention over the whole buffer with
a causal mask row per new token, so every shape is static and `torch.compile` specialises once per
pass size (a bucket). The layers share one compiled graph (they differ only in their tensors), so a
bucket compiles in seconds rather than the minutes a 30-layer graph takes on a CPU; the price is a
guard check per layer call.

    m = StaticLlama(hf_model, max_len=P + 16, dtype=torch.bfloat16, quant="int8").compile()
    m.prefill(ids[:, :P])                                   # fills rows 0..P-1
    logits = m(ids_new, input_pos=torch.arange(P, P + n))   # [1, n, V]; rows P..P+n-1 are overwritten next time

`run` is the pass our loop's compiled backends make (models/compiled_base.py): rows at any RoPE positions and
cache rows, attending either through SDPA (a prefill: causal over its own rows) or through `row_attention`,
which computes every row as its 1-token step would, whatever the rows per call (what lossless trees need).

quant: None (the dtype's own linears), "int8" (per-channel symmetric, `aten._weight_int8pack_mm`) or
"int4" (groups of 32 with a zero point, as llama.cpp's Q4_1 blocks; `aten._weight_int4pack_mm_for_cpu`),
as gpt-fast's quantize.py on a CPU. Only plain Llama layers (no biases, no sliding windows, default RoPE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CTCDrafterError

QUANTS = (None, "int8", "int4")
INT4_GROUP = 32  # llama.cpp's Q4_1 block size
INT4_INNER_K_TILES = 2
DENSE_ROWS = 64  # int4 products of more rows than this (only a prefill: passes are at most 64) run dense


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale).T, w_int8 [out, in] per output channel."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
        self.register_buffer("weight", (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x):  # [..., in] -> [..., out]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """Groups of INT4_GROUP input columns: w = (q - 8) * scale + zero, q in 0..15 (gpt-fast's convention)."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        out, inp = w.shape
        if inp % INT4_GROUP:
            raise CTCDrafterError(f"int4: {inp} input features are not a multiple of the group size {INT4_GROUP}")
        g = w.float().reshape(out, inp // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        zero = lo + 8 * scale
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
        # [in / group, out, 2]: the kernel's layout of (scale, zero)
        self.register_buffer("scales_zeros", torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        self._q = q.to(torch.uint8)  # kept for dequantized(); not a buffer
        # [in, out]: the same weights for products of many rows (a long prompt), where a dense product in the
        # activation dtype is about twice as fast as the int4 kernel (BENCHMARKS.md); not a buffer
        self._dense = self.dequantized().to(dtype).t().contiguous()

    def dequantized(self) -> torch.Tensor:
        s, z = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # [out, in / group] each
        q = self._q.float().reshape(*s.shape, INT4_GROUP)
        return ((q - 8) * s[..., None] + z[..., None]).reshape(self._q.shape)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > DENSE_ROWS:
            y = x2 @ self._dense
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, INT4_GROUP, self.scales_zeros)
        return y.reshape(*x.shape[:-1], -1)


def make_linear(w: torch.Tensor, dtype: torch.dtype, quant: str | None) -> nn.Module:
    if quant is None:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
        lin.weight.data.copy_(w)
        return lin.requires_grad_(False)
    return Int8Linear(w, dtype) if quant == "int8" else Int4Linear(w, dtype)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x):  # as HF's LlamaRMSNorm: in fp32, weight applied in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    """One decoder layer with its own static KV buffers. No per-layer Python scalars (a layer index would
    make the compiler specialise each layer): every layer runs the same compiled graph."""

    def __init__(self, layer, cfg, max_len: int, dtype: torch.dtype, quant: str | None):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
        self.attn_norm = RMSNorm(layer.input_layernorm.weight, cfg.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(layer.post_attention_layernorm.weight, cfg.rms_norm_eps, dtype)
        self.wqkv = make_linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), dtype, quant)
        self.wo = make_linear(a.o_proj.weight, dtype, quant)
        self.w13 = make_linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), dtype, quant)
        self.w2 = make_linear(m.down_proj.weight, dtype, quant)
        self.register_buffer("k_cache", torch.zeros(1, self.n_kv, max_len, self.hd, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(1, self.n_kv, max_len, self.hd, dtype=dtype))

    def forward(self, x, cos, sin, mask, input_pos, perm=None):
        # x [1,n,d]; cos/sin [1,1,n,hd]; input_pos [n]; mask None (a prefill: causal over rows 0..n-1),
        # [1,1,n,L] bool over cache rows 0..L-1 (SDPA), or with perm [n,L] (each row's keys in position
        # order, row_attention) [n,L] bool
        n = x.shape[1]
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(1, n, self.n_head, self.hd).transpose(1, 2)
        k = k.view(1, n, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(1, n, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if perm is None:  # over the cache rows the mask covers; no mask: a prefill, causal over rows 0..n-1
            L = n if mask is None else mask.shape[-1]
            y = F.scaled_dot_product_attention(q, self.k_cache[:, :, :L], self.v_cache[:, :, :L], attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=True)
        else:
            y = row_attention(q, self.k_cache[0], self.v_cache[0], perm, mask).to(x.dtype)
        h = x + self.wo(y.transpose(1, 2).reshape(1, n, -1))
        gate, up = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.w2(F.silu(gate) * up)


def row_attention(q, k_cache, v_cache, perm, valid):
    """Attention that computes each row as it would be computed alone, in a plain sequence: q [1,H,n,hd];
    k_cache/v_cache [Hkv,max_len,hd]; perm [n,L]: the cache row holding row r's key at position c (its
    past, then its ancestors in a tree: position order, whatever rows they sit in); valid [n,L]: the
    positions it sees (L: the rows in use, rounded up; trailing positions are masked and add exact zeros).
    -> [1,H,n,hd] fp32. Scores are per-position dot products, softmax and the weighted sum run in position
    order per row: nothing whose rounding moves with the rows per call (CPU flash attention's does, in bf16
    and fp32 alike), so a tree node's output is bit for bit the 1-token step's at that position
    (tests/test_compiled_base.py)."""
    H, n, hd = q.shape[1], q.shape[2], q.shape[3]
    hkv, L = k_cache.shape[0], perm.shape[-1]
    qg = q[0].float().view(hkv, H // hkv, n, 1, hd)                                     # [Hkv,g,n,1,hd]
    s = (qg * k_cache[:, None, None, :L]).sum(-1, dtype=torch.float32) * hd ** -0.5   # [Hkv,g,n,L] by cache row
    s = s.gather(-1, perm.expand(hkv, H // hkv, n, L))                                  # by position
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    y = torch.einsum("hgnl,hnld->hgnd", p, v_cache[:, perm].float())                    # [Hkv,g,n,hd]
    return y.reshape(1, H, n, hd)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StaticLlama(nn.Module):
    """A HF LlamaForCausalLM's weights, copied (the HF model is left as it was) into static-shape layers."""

    def __init__(self, hf_model, max_len: int, dtype: torch.dtype = torch.float32, quant: str | None = None):
        super().__init__()
        cfg = hf_model.config
        if quant not in QUANTS:
            raise CTCDrafterError(f"quant must be one of {QUANTS}, got {quant!r}")
        if getattr(cfg, "model_type", None) != "llama" or getattr(cfg, "attention_bias", False) \
                or getattr(cfg, "mlp_bias", False):
            raise CTCDrafterError(f"StaticLlama runs plain Llama layers, not a {cfg.model_type} base")
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise CTCDrafterError(f"StaticLlama runs the default RoPE, not {rope_type!r}")
        body = hf_model.model
        self.max_len, self.dtype = max_len, dtype
        self.embed = nn.Embedding.from_pretrained(body.embed_tokens.weight.detach().to(dtype), freeze=True)
        self.layers = nn.ModuleList(Block(layer, cfg, max_len, dtype, quant) for layer in body.layers)
        self.norm = RMSNorm(body.norm.weight, cfg.rms_norm_eps, dtype)
        self.lm_head = make_linear(hf_model.lm_head.weight, dtype, quant)
        pos = torch.arange(max_len)[None]
        cos, sin = body.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # [1,max_len,hd], fp32 as HF
        self.register_buffer("cos", cos.to(dtype)[0])
        self.register_buffer("sin", sin.to(dtype)[0])
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())
        self._block = self._head = None  # compiled callables (compile())

    def compile(self, **kw) -> "StaticLlama":
        """One compiled graph shared by the layers, one for the head; each pass size compiles on first use."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dynamic=None: a tree pass's attention length (perm's) is marked dynamic, the pass size stays static
        self._block = torch.compile(Block.forward, dynamic=None, **kw)
        self._head = torch.compile(self._head_eager, dynamic=False, **kw)
        return self

    def _head_eager(self, h):  # -> (the last hidden states, as HF's model output: normed; logits)
        h = self.norm(h)
        return h, self.lm_head(h)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """ids [1,n] at positions input_pos [n] -> logits [1,n,V] (fp32); their keys/values are written at
        input_pos, and each attends to rows <= its position. eager: skip the compiled graphs."""
        if int(input_pos[-1]) >= self.max_len:
            raise CTCDrafterError(f"position {int(input_pos[-1])} is past the static cache ({self.max_len} rows)")
        block = Block.forward if eager or self._block is None else self._block
        head = self._head_eager if eager or self._head is None else self._head
        x = self.embed(ids)
        cos, sin = self.cos[input_pos][None, None], self.sin[input_pos][None, None]
        mask = self.causal[input_pos][None, None]
        for layer in self.layers:
            x = block(layer, x, cos, sin, mask, input_pos)
        return head(x)[1].float()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The first ids.shape[1] positions, eagerly (a one-off shape: not worth a compile)."""
        return self.forward(ids, torch.arange(ids.shape[1], device=ids.device), eager=True)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
            head_rows: int | None = None, eager: bool = False, perm: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pass whose rows need not be consecutive positions (a token tree): ids [1,n] at RoPE positions
        [n], keys/values written at cache rows `slots` [n], row i attending to the cache rows where mask
        [1,1,n,L] (bool, over rows 0..L-1) is True (None: rows 0..i, a prefill written at rows 0..n-1), or
        with perm [n,L] (row_attention; L <= max_len) to positions c where mask [n,L] is True, read from
        cache rows perm[i, c]. -> (normed last hidden states [1,n,d], logits [1,n or head_rows,V] in the
        engine's dtype); head_rows: the head only over the last rows (a prefill)."""
        if int(slots.max()) >= self.max_len:
            raise CTCDrafterError(f"row {int(slots.max())} is past the static cache ({self.max_len} rows)")
        block = Block.forward if eager or self._block is None else self._block
        head = self._head_eager if eager or self._head is None else self._head
        x = self.embed(ids)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        if perm is not None and not eager:
            torch._dynamo.maybe_mark_dynamic(perm, 1)
            torch._dynamo.maybe_mark_dynamic(mask, 1)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # pass sizes: one graph each
            for layer in self.layers:
                x = block(layer, x, cos, sin, mask, slots, perm)
        if head_rows is not None:
            h = self.norm(x)
            return h, self.lm_head(h[:, -head_rows:])
        return head(x)
