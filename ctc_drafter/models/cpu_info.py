"""Which CPU this is: one home for the model name and feature flags that measured choices depend on.

Every choice made from them (resolve_dtype's auto, training's precision, BaseModel's tree row policy, the
kernel cache's fingerprint) takes a `CPU` argument that defaults to `host_cpu()`, so tests pass in a fake
CPU instead of reading the one they happen to run on.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class CPU:
    """A CPU's model name and feature flags (/proc/cpuinfo spelling: amx_bf16, avx512_bf16, ...)."""

    name: str
    flags: frozenset[str] = frozenset()

    @property
    def has_bf16(self) -> bool:
        """Native bf16 matrix units (AMX or AVX512-BF16): where bf16 matmuls over many rows beat fp32."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def has_amx(self) -> bool:
        """AMX bf16 tiles. The one CPU kind whose bf16 linear kernels were measured row-invariant up to a
        probed size (models/row_limit.py); with AVX512-BF16 alone (an AMD EPYC) they are not, at rare near-ties."""
        return "amx_bf16" in self.flags

    def identity(self) -> dict:
        """{"cpu": name, "flags": sorted flags}: what records and caches store."""
        return {"cpu": self.name, "flags": sorted(self.flags)}


@cache
def host_cpu() -> CPU:
    """The CPU this process runs on (Linux /proc/cpuinfo; elsewhere what `platform` knows, without flags)."""
    name, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM spelling
                    flags = value.split()
    except OSError:
        pass
    return CPU(name or platform.processor() or platform.machine(), frozenset(flags))


def cpu_identity() -> dict:
    """The host's model name and flags, as records store them (scripts' "which CPU is this")."""
    return host_cpu().identity()
