"""Hardware-aware precision: `--precision auto` picks bf16 only where bf16 is fast.

- CUDA: bf16 when the device supports it (Ampere and newer), else fp16 autocast (with a GradScaler
  where the caller trains), else fp32.
- CPU: bf16 only when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16). Without it PyTorch
  emulates bf16 and a training step is about 10x slower than fp32 (measured: 6.8 vs 0.67 img/s on a
  2-core AVX2-only EPYC), so auto chooses fp32 there.
An explicit `bf16` on a CPU without native bf16 still runs, with a one-line warning.
"""
import logging
import os

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "bf16", "fp16", "fp32")
# /proc/cpuinfo flags meaning "native bf16 matmul" on x86 (AVX512_BF16: Cooper Lake, Zen 4+; AMX: SPR+)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values that keep oneDNN's bf16 kernels (any lower cap emulates bf16)
ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "AVX2_VNNI_2", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512", "AVX10_2_512_AMX_2")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor ('flags' on x86, 'Features' on ARM), or empty."""
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """(True, why) when this CPU computes bf16 natively; the reason names the flag or its absence."""
    forced = os.environ.get("PROTEUS_CPU_BF16")  # tests and odd platforms: "1" / "0"
    if forced in ("0", "1"):
        return forced == "1", f"PROTEUS_CPU_BF16={forced}"
    flags = cpu_flags()
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if found and cap and cap not in ONEDNN_BF16_ISAS:
        # oneDNN (the bf16 GEMM path) is capped below its bf16 kernels: bf16 is emulated as on AVX2 CPUs
        return False, f"CPU has {', '.join(found)} but ONEDNN_MAX_CPU_ISA={cap} disables oneDNN's bf16 kernels"
    if found:
        return True, f"CPU has native bf16 ({', '.join(found)})"
    if "bf16" in flags:  # ARMv8.6 BF16 extension (the Features line)
        return True, "CPU has native bf16 (ARM bf16)"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"CPU has no native bf16 (no avx512_bf16/amx_bf16 flag; torch CPU capability {capability})"


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(precision, reason) for `requested` in CHOICES on `device`; warns when bf16 will be emulated."""
    if requested not in CHOICES:
        raise ValueError(f"unknown precision {requested!r}; expected one of {CHOICES}")
    device = torch.device(device)
    if device.type == "cuda":
        if requested != "auto":
            return requested, "requested"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp16", f"auto: {torch.cuda.get_device_name(device)} has no bf16; fp16 autocast"
    if device.type != "cpu":
        return ("fp32", f"auto: {device.type} device, fp32") if requested == "auto" else (requested, "requested")
    native, why = cpu_native_bf16()
    if requested == "auto":
        return ("bf16", f"auto: {why}") if native else ("fp32", f"auto: {why}, so fp32 (bf16 would be emulated, "
                                                                 f"about 10x slower)")
    if requested == "bf16" and not native:
        log.warning("--precision bf16 on a CPU without native bf16: it is emulated and about 10x slower than "
                    "fp32 (%s); --precision auto picks fp32 here", why)
        return "bf16", f"requested, emulated: {why}"
    return requested, "requested"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
