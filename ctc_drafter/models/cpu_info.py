"""Which CPU this is: one home for the model name and feature flags that measured choices depend on."""

from __future__ import annotations

import platform
from functools import cache


@cache
def cpu_identity() -> dict:
    """CPU model name and feature flags (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    name, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM spelling
                    flags = sorted(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return {"cpu": name, "flags": flags}


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AMX or AVX512-BF16): where bf16 matmuls over many rows beat fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_identity()["flags"]))


def cpu_has_amx() -> bool:
    """AMX bf16 tiles. The one CPU kind whose bf16 linear kernels were measured row-invariant up to a
    probed size (models/row_limit.py); with AVX512-BF16 alone (an AMD EPYC) they are not, at rare near-ties."""
    return "amx_bf16" in cpu_identity()["flags"]
