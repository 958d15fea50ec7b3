"""What the machine offers, read without importing torch (the CLI, the engine and the benchmarks ask)."""
from __future__ import annotations


def _cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


# the vector units that decide the fast paths (benchmarks/RESULTS.md writes them beside every figure)
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_field(key: str) -> str:
    return next((ln.split(":", 1)[1].strip() for ln in (_cpuinfo() or "").splitlines() if ln.startswith(key)), "")


def cpu_name() -> str:
    """The CPU model ('AMD EPYC', 'Intel(R) Xeon(R) ...')."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = VECTOR_FLAGS) -> str:
    """The flags of ``wanted`` this CPU has, space-separated ('none of them' without any)."""
    have = set(_cpuinfo_field("flags").split())
    return " ".join(f for f in wanted if f in have) or "none of " + ", ".join(wanted)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: its bf16 convolutions are then emulated, not native
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast is faster, not slower.

    False too where the environment caps the kernels below that (``ATEN_CPU_CAPABILITY=avx2`` or
    ``ONEDNN_MAX_CPU_ISA=AVX2``, say: how benchmarks/RESULTS.md emulates an AVX2 CPU on a newer one), so that the
    emulated machine takes the path the real one would.
    """
    import os

    flags = _cpuinfo() or ""
    if not (" avx512_bf16" in flags or " amx_bf16" in flags):
        return False
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return aten not in ("default", "avx2") and onednn not in _ONEDNN_BELOW_BF16


def int8_may_saturate() -> bool:
    """True on an x86 CPU without VNNI (AVX2 or AVX-512 without avx512_vnni/avx_vnni): its u8 x s8 dot product
    (VPMADDUBSW) adds pairs in int16, which 8-bit weights can overflow; 7-bit weights cannot (255 * 63 * 2 < 2**15)."""
    info = _cpuinfo()
    if info is None or " avx2" not in info:  # not x86 with AVX2 (ARM's sdot, say): no int16 pair sums
        return False
    return not (" avx512_vnni" in info or " avx_vnni" in info)
