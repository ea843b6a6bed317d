"""llama.cpp's own greedy (through llama-cpp-python, an optional extra) as a reference engine.

What people who run small models on a CPU use: the base's GGUF decoded by llama.cpp, one `llama_decode` per
token, llama.cpp's greedy sampler. `LlamaCppEngine.chat` answers like `HFEngine.chat`: the same prompt ids
(our tokenizer and template; llama.cpp only decodes them), the same EOS set, the wall time of the whole call
with its prefill (the context is reset first, so no earlier request's cache is reused), EOS kept in `tokens`.

    reason = llama_cpp_missing()            # '' when `import llama_cpp` works
    engine = LlamaCppEngine(base, gguf_for("default"), threads=2)
    engine.chat("Why is the sky blue?", max_new_tokens=64).tokens_per_s
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..decoding.generate import ChatMixin, GenerationResult, truncate_new_tokens
from ..errors import CTCDrafterError
from ..models.base import DEFAULT_BASE, BaseModel

LLAMACPP = "llamacpp"
INSTALL_HINT = "pip install llama-cpp-python (README, optional extras)"


def llama_cpp_missing() -> str:
    """Why llama.cpp cannot run here ('' when it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama_cpp is not importable ({INSTALL_HINT})"
    except OSError as e:  # the package is there but its shared library does not load
        return f"llama_cpp does not load: {e}"
    return ""


def gguf_for(base_model: str) -> Path:
    """The GGUF llama.cpp runs for a base given as --base-model: the file the embedded default comes from,
    or the .gguf file given; a Hugging Face folder has none."""
    if base_model == DEFAULT_BASE:
        from ..models.base import DEFAULT_GGUF, _default_gguf_dir

        return _default_gguf_dir() / DEFAULT_GGUF
    p = Path(base_model).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p
    raise CTCDrafterError(f"llama.cpp runs GGUF files; the base {base_model} is not one (give --base-model "
                          "default or a .gguf file)")


class LlamaCppEngine(ChatMixin):
    """Greedy answers from llama.cpp on `gguf`; `base` gives the tokenizer, template and EOS set."""

    def __init__(self, base: BaseModel, gguf: str | Path, threads: int, n_ctx: int | None = None):
        reason = llama_cpp_missing()
        if reason:
            raise CTCDrafterError(f"the llama.cpp engine needs llama-cpp-python: {reason}")
        if threads < 1:
            raise CTCDrafterError(f"threads must be >= 1, got {threads}")
        from llama_cpp import Llama

        from ..models.cpu_info import host_cpu

        self.base, self.gguf, self.threads = base, Path(gguf), threads
        try:
            # the AMX repacked-weight kernel segfaults on these CPUs (issue 33)
            with _without_extra_buffers() if host_cpu().has_amx else nullcontext():
                self.llm = Llama(model_path=str(self.gguf), n_ctx=n_ctx or min(base.max_length, 8192),
                                 n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise CTCDrafterError(f"llama.cpp cannot load {self.gguf}: {e}") from e
        desc = self.llm.metadata.get("general.file_type")
        self.weights = _FILE_TYPES.get(str(desc), f"GGUF file type {desc}") if desc is not None else "GGUF"

    @property
    def name(self) -> str:
        return LLAMACPP

    def label(self) -> str:
        return f"llama.cpp greedy ({self.gguf.name}, {self.threads} thread{'s' if self.threads > 1 else ''})"

    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, **_ignored) -> GenerationResult:
        """Greedy answer after `input_ids`, timed like the other engines (prefill included)."""
        if temperature > 0:
            raise CTCDrafterError("the llama.cpp reference engine decodes greedily (--temperature 0)")
        if max_new_tokens < 1:
            raise CTCDrafterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = list(input_ids)
        if not prompt:
            raise CTCDrafterError("empty prompt")
        room = self.llm.n_ctx() - len(prompt)
        if room < 1:
            raise CTCDrafterError(f"prompt is {len(prompt)} tokens but llama.cpp's context is {self.llm.n_ctx()}")
        limit, eos, tokens = min(max_new_tokens, room), self.base.eos_token_ids, []
        self.llm.reset()  # no prefix reuse from an earlier request: the prefill is part of the time
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                     reset=True):
            tokens.append(int(tok))
            if tok in eos or len(tokens) >= limit:
                break
        wall = time.perf_counter() - t0
        tokens = truncate_new_tokens(tokens, eos, limit)
        return GenerationResult(tokens=tokens, steps=len(tokens), accept_lengths=[1] * len(tokens), wall_s=wall,
                                stop_reason=("eos" if tokens and tokens[-1] in eos else
                                             "length" if len(tokens) >= max_new_tokens else "context"))


@contextmanager
def _without_extra_buffers():
    """Models loaded by `Llama` meanwhile get use_extra_bufts = False (no repacked weights): `Llama` takes
    no argument for it, so its defaults are changed while it loads."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


# llama.cpp's enum llama_ftype for the file types a base is usually shipped in
_FILE_TYPES = {"0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0", "9": "Q5_1",
               "15": "Q4_K_M", "17": "Q5_K_M", "18": "Q6_K", "32": "BF16"}
