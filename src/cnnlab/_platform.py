"""What the machine offers, read without importing torch (the CLI, the engine and the benchmarks ask)."""
from __future__ import annotations


def _cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast is faster, not slower."""
    flags = _cpuinfo() or ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def int8_may_saturate() -> bool:
    """True on an x86 CPU without VNNI (AVX2 or AVX-512 without avx512_vnni/avx_vnni): its u8 x s8 dot product
    (VPMADDUBSW) adds pairs in int16, which 8-bit weights can overflow; 7-bit weights cannot (255 * 63 * 2 < 2**15)."""
    info = _cpuinfo()
    if info is None or " avx2" not in info:  # not x86 with AVX2 (ARM's sdot, say): no int16 pair sums
        return False
    return not (" avx512_vnni" in info or " avx_vnni" in info)
