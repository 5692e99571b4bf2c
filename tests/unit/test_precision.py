"""`--mixed-precision auto`: bf16 where the worker's hardware computes bfloat16 natively."""

import pytest

from job import precision

ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx512f", "amx_tile", "amx_bf16"}
OLD_CPU = {"avx2", "avx512f"}
A100, V100 = ("NVIDIA A100-SXM4-40GB", (8, 0)), ("Tesla V100-SXM2-16GB", (7, 0))


@pytest.mark.parametrize("gpus, flags, mode, why", [
    ([], ZEN4, "bf16", "auto: this CPU computes bfloat16 natively (avx512_bf16)"),
    ([], SAPPHIRE_RAPIDS, "bf16", "auto: this CPU computes bfloat16 natively (amx_bf16)"),
    ([], OLD_CPU, "off", "auto: this CPU has no native bfloat16 (AVX512_BF16 or AMX)"),
    ([A100, A100], OLD_CPU, "bf16", "auto: these GPUs (NVIDIA A100-SXM4-40GB) compute bfloat16 natively"),
    ([V100], ZEN4, "off", "auto: Tesla V100-SXM2-16GB (compute capability 7.0) computes bfloat16 only from "
                          "compute capability 8.0"),
    ([A100, V100], ZEN4, "off", "auto: Tesla V100-SXM2-16GB (compute capability 7.0) computes bfloat16 only from "
                                "compute capability 8.0"),
])
def test_auto_picks_bf16_only_on_native_hardware(gpus, flags, mode, why):
    assert precision.choose("auto", gpus, flags) == (mode, why, None)


def test_asked_for_is_kept_with_one_warning_where_it_will_be_slow():
    assert precision.choose("off", [], ZEN4) == ("off", "asked for", None)
    assert precision.choose("bf16", [], ZEN4) == ("bf16", "asked for", None)
    mode, _, warning = precision.choose("bf16", [], OLD_CPU)
    assert mode == "bf16" and warning.startswith("warning: --mixed-precision bf16 on a CPU without AVX512_BF16 or AMX")
    mode, _, warning = precision.choose("bf16", [V100], ZEN4)
    assert mode == "bf16" and "Tesla V100-SXM2-16GB (compute capability 7.0), which has no native bfloat16" in warning
    assert precision.choose("fp16", [V100], OLD_CPU) == ("fp16", "asked for", None)


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()  # macOS: no /proc
