"""Base models: loading (HF folders, GGUF, the embedded default) and chat templates."""

from .base import BaseModel, load_base_model, resolve_device, resolve_dtype
from .templates import TEMPLATES, build_prompt_ids, encode_conversation

__all__ = [
    "BaseModel",
    "load_base_model",
    "resolve_device",
    "resolve_dtype",
    "TEMPLATES",
    "build_prompt_ids",
    "encode_conversation",
]
