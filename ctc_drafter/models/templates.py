"""Chat templates: the tokenizer's own, or the built-in Vicuna v1.1 and LLaMA-2-chat formats.

Two entry points: `build_prompt_ids` (messages so far + the assistant's turn opened, for generation)
and `encode_conversation` (a whole conversation with a mask of the assistant tokens, for training).
"""

from __future__ import annotations

from ..errors import CTCDrafterError

TEMPLATES = ("auto", "vicuna", "llama2chat")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."
)


def _resolve(tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise CTCDrafterError(f"unknown template {template!r} (use one of {', '.join(TEMPLATES)})")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "vicuna"
    return template


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """An optional leading system message (chat clients send one) and the turns after it."""
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return messages[0].get("content"), messages[1:]
    return None, messages


def _check(messages: list[dict]) -> None:
    system, turns = _split_system(messages)
    if system is not None and not isinstance(system, str):
        raise CTCDrafterError("the system message has no text")
    if not turns:
        raise CTCDrafterError("empty conversation")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise CTCDrafterError(f"message {i} should be from the {want}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise CTCDrafterError(f"message {i} has no text")


def _render_builtin(kind: str, messages: list[dict], eos: str,
                    bos_ids: list[int]) -> list[tuple[str | list[int], bool]]:
    """Segments (text or token ids, is_assistant) for the built-in templates, after the leading BOS.

    LLaMA-2-chat starts every user turn after the first with a BOS too, as Meta's reference code and
    FastChat do (`... {answer} </s><s>[INST] ...`). A leading system message replaces the default
    system prompt.
    """
    system, messages = _split_system(messages)
    segs: list[tuple[str | list[int], bool]] = []
    if kind == "vicuna":
        segs.append(((VICUNA_SYSTEM if system is None else system) + " ", False))
        for m in messages:
            if m["role"] == "user":
                segs.append((f"USER: {m['content']} ASSISTANT:", False))
            else:
                segs.append((" " + m["content"] + eos, True))
        return segs
    # llama2chat
    for i, m in enumerate(messages):
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{LLAMA2_SYSTEM if system is None else system}\n<</SYS>>\n\n" if i == 0 else ""
            if i > 0 and bos_ids:
                segs.append((bos_ids, False))
            segs.append((f"[INST] {sys_block}{m['content']} [/INST]", False))
        else:
            segs.append((" " + m["content"] + " " + eos, True))
    return segs


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []


def _encode_segments(tokenizer, segs):
    ids, mask = list(_bos(tokenizer)), [False] * len(_bos(tokenizer))
    for text, is_asst in segs:
        t = text if isinstance(text, list) else tokenizer.encode(text, add_special_tokens=False)
        ids += t
        mask += [is_asst] * len(t)
    return ids, mask


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:  # some versions return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def build_prompt_ids(tokenizer, messages: list[dict], template: str = "auto") -> list[int]:
    """Token ids of `messages` ([system,] user, assistant, user, ...) with the assistant's reply opened."""
    _check(messages)
    if messages[-1]["role"] != "user":
        raise CTCDrafterError("the last message of a prompt must be the user's")
    if not messages[-1]["content"].strip():
        raise CTCDrafterError("empty prompt")
    kind = _resolve(tokenizer, template)
    if kind == "chat":
        return _chat_ids(tokenizer, messages, add_generation_prompt=True)
    segs = _render_builtin(kind, messages, tokenizer.eos_token or "</s>", _bos(tokenizer))
    return _encode_segments(tokenizer, segs)[0]


def encode_conversation(tokenizer, messages: list[dict], template: str = "auto") -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation and a mask that is True on the assistant's tokens (incl. its end token).

    For tokenizer chat templates the assistant span of turn i is what rendering turns 0..i adds to
    rendering turns 0..i-1 with the generation prompt; templates are prefix-consistent in practice,
    and a template that is not raises rather than mislabel tokens.
    """
    _check(messages)
    kind = _resolve(tokenizer, template)
    if kind != "chat":
        segs = _render_builtin(kind, messages, tokenizer.eos_token or "</s>", _bos(tokenizer))
        return _encode_segments(tokenizer, segs)
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise CTCDrafterError("the tokenizer's chat template is not prefix-consistent; use --template vicuna")
        mask += [False] * (len(prompt) - len(ids)) + [True] * (len(full) - len(prompt))
        ids = full
    return ids, mask
