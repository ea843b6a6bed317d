"""What `ctc-drafter serve` was started with: the served name, limits, and defaults for requests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the one id in GET /v1/models; requests naming another model get 404
    speculative: bool = True  # False: the --baseline server (the same loop without a draft)
    max_queue: int = 16  # requests waiting behind the one being decoded; one more gets 429
    api_key: str | None = None  # if set, /v1/* require `Authorization: Bearer <api_key>`
    template: str = "auto"  # chat format for /v1/chat/completions
    # Defaults for requests that leave a parameter out (greedy unless told otherwise: the lossless setting).
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
