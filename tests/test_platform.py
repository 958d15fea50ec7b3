"""What the machine offers: bf16 is native only where the CPU has it and the environment does not cap it."""
from __future__ import annotations

import pytest

from cnnlab import _platform

ZEN4 = "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16\n"
AVX2_ONLY = "flags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def cpu(monkeypatch):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)

    def use(flags: str) -> None:
        monkeypatch.setattr(_platform, "_cpuinfo", lambda: flags)

    return use


def test_bf16_follows_the_cpu_flags(cpu):
    cpu(ZEN4)
    assert _platform.cpu_has_bf16()
    cpu(AVX2_ONLY)
    assert not _platform.cpu_has_bf16()
    cpu(None)  # no /proc/cpuinfo (not Linux): no claim of bf16
    assert not _platform.cpu_has_bf16()


@pytest.mark.parametrize("var, value, native", [
    ("ATEN_CPU_CAPABILITY", "avx2", False),
    ("ATEN_CPU_CAPABILITY", "default", False),
    ("ATEN_CPU_CAPABILITY", "avx512", True),
    ("ONEDNN_MAX_CPU_ISA", "AVX2", False),
    ("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni", False),
    ("DNNL_MAX_CPU_ISA", "AVX2", False),
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
    ("ONEDNN_MAX_CPU_ISA", "ALL", True),
])
def test_an_emulated_older_cpu_is_taken_at_its_word(cpu, monkeypatch, var, value, native):
    # benchmarks/RESULTS.md emulates the AVX2 EPYC by capping the kernels: the demo must then pick its fp32 path
    cpu(ZEN4)
    monkeypatch.setenv(var, value)
    assert _platform.cpu_has_bf16() is native


def test_cpu_name_and_flags_read_cpuinfo(cpu):
    cpu("processor\t: 0\nmodel name\t: AMD EPYC 9654\n" + ZEN4)
    assert _platform.cpu_name() == "AMD EPYC 9654"
    assert _platform.cpu_flags() == "avx2 avx512f avx512_vnni avx512_bf16"  # in VECTOR_FLAGS' order
    assert _platform.cpu_flags(("fma", "amx_bf16")) == "fma"
    cpu(AVX2_ONLY)
    assert _platform.cpu_flags(("amx_bf16",)) == "none of amx_bf16"
    cpu(None)  # not Linux: the platform module's name, flags none
    assert isinstance(_platform.cpu_name(), str) and _platform.cpu_flags().startswith("none of")
