"""log.jsonl (one line per logging step and per epoch; + TensorBoard when installed), written by the
main process, and trimming it back to the last finished epoch when a run resumes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

LOG = "log.jsonl"


def truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines from epochs after `last_epoch` (an interrupted epoch that is being redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= last_epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(s + "\n" for s in keep))
    os.replace(tmp, path)


class RunLog:
    """log.jsonl (+ TensorBoard when installed), main process only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / LOG
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: the JSON log is enough
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            try:
                self._write_tensorboard(record)
            except Exception as e:  # noqa: BLE001 - a side channel must not stop training (seen: gVisor /tmp)
                logger.warning("TensorBoard logging stopped (%s); log.jsonl goes on", str(e).splitlines()[0][:200])
                self.tb = None

    def _write_tensorboard(self, record: dict) -> None:
        prefix = record["event"]
        for split in ("", "train", "eval"):
            vals = record if not split else record.get(split) or {}
            for key, v in vals.items():
                tag = f"{prefix}/{split + '_' if split else ''}{key}"
                if isinstance(v, (int, float)) and key not in ("epoch", "step"):
                    self.tb.add_scalar(tag, v, record["step"])
                elif key == "acc" and isinstance(v, list):
                    for j, a in enumerate(v):
                        if a is not None:
                            self.tb.add_scalar(f"{tag}_{j + 1}", a, record["step"])
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception:  # noqa: BLE001 - see write()
                pass
