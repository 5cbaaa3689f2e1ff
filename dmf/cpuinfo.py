"""What this CPU can do, for engine choice and for every performance figure (torch-free).

Engine speed on this model depends on a few ISA extensions: bf16 dot products (AVX512_BF16,
AMX-BF16) make bf16 inference ~2x fp32; int8 dot products (AVX512_VNNI, AVX-VNNI, AMX-INT8) make
static int8 fast. Read from /proc/cpuinfo (Linux); elsewhere the flags are unknown (empty).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags a performance figure is reported with (the ones engine speed depends on).
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                  "amx_tile")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "model name" of /proc/cpuinfo, else platform.processor()
    flags: frozenset[str]  # every ISA flag the kernel reports
    cores: int  # logical CPUs visible to this process

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (otherwise bf16 is emulated and slower than fp32)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8_dot(self) -> bool:
        """Native int8 dot products (VNNI / AMX): static int8 runs at its full speed."""
        return any(f in self.flags for f in INT8_DOT_FLAGS)

    def reported_flags(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]

    def summary(self) -> dict:
        return {"cpu": self.model, "cores": self.cores, "isa": self.reported_flags(), "bf16": self.bf16,
                "int8_dot": self.int8_dot}

    def line(self) -> str:
        """One line for tables and reports: model, cores, the flags that matter."""
        isa = " ".join(self.reported_flags()) or "no AVX2/AVX-512 flags reported"
        return f"{self.model}, {self.cores} cores ({isa})"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_info(cpuinfo_path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        model, flags = "", frozenset()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model=model or platform.processor() or platform.machine(), flags=flags, cores=cores)
