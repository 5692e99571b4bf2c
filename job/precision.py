"""Which compute precision a worker trains in: `--mixed-precision auto` picks bf16 where the
hardware computes bfloat16 natively and float32 elsewhere.

Decided on each worker, not on the driver: on a cluster the driver runs on a CPU head while the
workers have the GPUs. Pure functions over what the worker sees, so the rule is testable on any
machine.
"""

from __future__ import annotations

# CPU flags (Linux /proc/cpuinfo) of bfloat16 dot-product instructions: AVX512_BF16 (AMD Zen 4,
# Intel Cooper Lake and later) and AMX (Intel Sapphire Rapids and later). oneDNN runs bf16
# convolutions and matmuls on them; elsewhere bf16 is emulated and slower than float32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# NVIDIA GPUs compute bfloat16 in their tensor cores from Ampere (compute capability 8.0) on.
NATIVE_BF16_GPU = (8, 0)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo does not exist (macOS)."""
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose(requested: str, gpus: list[tuple[str, tuple[int, int] | None]], flags: set[str]) -> tuple[str, str, str | None]:
    """(mode, why, warning) for `requested` (off, bf16, fp16 or auto) on a worker with these GPUs
    (name, compute capability) and CPU flags. `warning` is one line where the choice will be slow."""
    native_cpu = sorted(flags.intersection(NATIVE_BF16_CPU_FLAGS))
    if gpus:
        old = [f"{name} (compute capability {'.'.join(map(str, capability))})"
               for name, capability in gpus if capability is None or capability < NATIVE_BF16_GPU]
        hardware = "these GPUs" if len(gpus) > 1 else "this GPU"
        if requested == "auto":
            if old:
                return "off", f"auto: {old[0]} computes bfloat16 only from compute capability 8.0", None
            return "bf16", f"auto: {hardware} ({gpus[0][0]}) compute bfloat16 natively", None
        warning = None
        if requested == "bf16" and old:
            warning = (f"warning: --mixed-precision bf16 on {old[0]}, which has no native bfloat16: expect it "
                       "slower than --mixed-precision off or fp16")
        return requested, "asked for", warning
    if requested == "auto":
        if native_cpu:
            return "bf16", f"auto: this CPU computes bfloat16 natively ({', '.join(native_cpu)})", None
        return "off", "auto: this CPU has no native bfloat16 (AVX512_BF16 or AMX)", None
    warning = None
    if requested == "bf16" and not native_cpu:
        warning = ("warning: --mixed-precision bf16 on a CPU without AVX512_BF16 or AMX: bfloat16 is emulated, "
                   "expect it slower than --mixed-precision off")
    return requested, "asked for", warning


def describe(mode: str) -> str:
    return {"off": "float32", "bf16": "bf16 (bfloat16 compute, float32 weights)",
            "fp16": "fp16 (float16 compute with loss scaling, float32 weights)"}[mode]
