"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""


def test_cpu_capability_decision_reads_the_flags(monkeypatch, tmp_path, caplog):
    from common import precision

    monkeypatch.delenv("PROTEUS_CPU_BF16", raising=False)
    avx2 = tmp_path / "cpuinfo_avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "cpuinfo_spr"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    real = precision.cpu_flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: real(str(avx2)))
    assert precision.resolve_precision("auto", "cpu")[0] == "fp32"
    assert "no native bf16" in precision.resolve_precision("auto", "cpu")[1]
    assert precision.resolve_precision("bf16", "cpu")[0] == "bf16" and "emulated" in caplog.text
    monkeypatch.setattr(precision, "cpu_flags", lambda: real(str(amx)))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.resolve_precision("auto", "cpu") == ("bf16", "auto: CPU has native bf16 (avx512_bf16, amx_bf16)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below its bf16 kernels: emulated again
    assert precision.resolve_precision("auto", "cpu")[0] == "fp32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in precision.resolve_precision("auto", "cpu")[1]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.resolve_precision("auto", "cpu")[0] == "bf16"
