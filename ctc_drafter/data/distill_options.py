"""What a distill run is asked to do (DistillOptions: mode, template, lengths, sampling, shard size)
and what it counted (Stats: records, sequences, tokens, agreement, skips), as the manifest records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..decoding.verify import check_sampling
from ..errors import CTCDrafterError

MODES = ("regenerate", "teacher-forced")
MODE_ALIASES = {"base": "regenerate", "data": "teacher-forced", "teacher_forced": "teacher-forced"}


@dataclass
class DistillOptions:
    mode: str = "regenerate"  # regenerate: the base answers each user turn; teacher-forced: the dataset's answers
    template: str = "auto"
    max_len: int = 2048  # tokens per sequence (prompt + replies), longer ones are cut
    max_new_tokens: int = 512  # per generated reply
    temperature: float = 0.0  # 0 = greedy replies
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None  # records to read (all when None)
    shard_size: int = 64  # records per shard: fixes which shard every record lands in
    save_hidden: bool = False
    batch_size: int = 8  # prompts decoded together / sequences per labelling pass; not part of the data's
    # identity (a resume may change it), though in float32 it can flip a near-tie (scripts/batch_agreement.py)

    def __post_init__(self):
        self.mode = MODE_ALIASES.get(self.mode, self.mode)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise CTCDrafterError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_new_tokens", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise CTCDrafterError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_len < 2:
            raise CTCDrafterError("--max-len must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise CTCDrafterError("--limit must be at least 1")
        check_sampling(self.temperature, 0, self.top_p)

    def content_key(self) -> dict:
        """The options that decide what the shards hold: a resumed run must agree on all of them."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("limit")  # records are taken in order: a larger limit extends a folder
        if self.mode == "teacher-forced":  # generation settings play no part
            for k in ("max_new_tokens", "temperature", "top_p", "seed"):
                d.pop(k)
        return d


@dataclass
class Stats:
    records: int = 0  # read, including skipped and malformed ones
    malformed: int = 0
    sequences: int = 0
    tokens: int = 0
    assistant_tokens: int = 0  # positions with loss_mask 1 (the next token is the assistant's)
    agree: int = 0  # trained positions where the data's next token is the base's greedy token
    replies_generated: int = 0
    replies_unfinished: int = 0  # cut by max_new_tokens / max_len before the base ended them
    skipped: dict = field(default_factory=dict)  # reason -> records

    def add(self, other: "Stats") -> None:
        for k, v in asdict(other).items():
            if k == "skipped":
                for r, n in v.items():
                    self.skipped[r] = self.skipped.get(r, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["agreement"] = round(self.agree / self.assistant_tokens, 4) if self.assistant_tokens else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        return cls(**{k: v for k, v in d.items() if k != "agreement"})
