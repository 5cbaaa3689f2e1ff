"""ISA detection (dmf.cpuinfo) on /proc/cpuinfo texts of an AVX2-only and an AVX-512 BF16/VNNI
CPU, and torch's bf16 autocast on a CPU with native bf16 (skipped with the reason elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from dmf.cpuinfo import CpuInfo, cpu_info, parse_cpuinfo

BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat sse sse2 ht syscall nx"
AVX2_ONLY = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: {BASE_FLAGS} avx f16c avx2 fma bmi1 bmi2 sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: {BASE_FLAGS} avx f16c avx2 fma bmi1 bmi2 sha_ni
"""
# Sapphire Rapids: AVX-512 with BF16 and VNNI, AVX-VNNI, AMX (flags listed out of REPORTED_FLAGS order)
AVX512_BF16 = f"""processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: {BASE_FLAGS} amx_tile avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_int8
"""


def _info(text: str, cores: int = 2) -> CpuInfo:
    model, flags = parse_cpuinfo(text)
    return CpuInfo(model=model, flags=flags, cores=cores)


def test_avx2_only_cpu():
    info = _info(AVX2_ONLY)
    assert info.model == "AMD EPYC 7B12" and "sha_ni" in info.flags
    assert not info.bf16 and not info.int8_dot
    assert info.reported_flags() == ["avx2", "fma"]
    assert info.line() == "AMD EPYC 7B12, 2 cores (avx2 fma)"
    assert info.summary() == {"cpu": "AMD EPYC 7B12", "cores": 2, "isa": ["avx2", "fma"], "bf16": False,
                              "int8_dot": False}


def test_avx512_bf16_vnni_cpu():
    info = _info(AVX512_BF16, cores=4)
    assert info.bf16 and info.int8_dot
    assert info.reported_flags() == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                                     "amx_bf16", "amx_int8", "amx_tile"]  # REPORTED_FLAGS order, not the kernel's
    assert info.line().startswith("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 4 cores (avx2 fma avx512f ")


def test_only_one_of_the_bf16_or_int8_flags_is_enough():
    vnni_only = _info(AVX2_ONLY.replace("sha_ni", "sha_ni avx512f avx512_vnni"))
    assert vnni_only.int8_dot and not vnni_only.bf16
    amx_bf16 = _info(AVX2_ONLY.replace("sha_ni", "sha_ni amx_bf16"))
    assert amx_bf16.bf16 and not amx_bf16.int8_dot


def test_first_processor_wins_and_missing_fields_are_empty():
    model, flags = parse_cpuinfo(AVX2_ONLY + "\n" + AVX512_BF16)  # a later processor does not add its flags
    assert model == "AMD EPYC 7B12" and "avx2" in flags and "avx512_bf16" not in flags
    assert parse_cpuinfo("") == ("", frozenset())
    assert CpuInfo(model="x", flags=frozenset(), cores=1).line() == "x, 1 cores (no AVX2/AVX-512 flags reported)"


def test_cpu_info_reads_a_file_and_survives_a_missing_one(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AVX512_BF16)
    info = cpu_info(path)
    assert info.model.startswith("Intel(R) Xeon(R)") and info.bf16 and info.cores >= 1
    missing = cpu_info(tmp_path / "absent")
    assert missing.flags == frozenset() and missing.model  # platform's name instead, never empty


@pytest.mark.skipif(not cpu_info().bf16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16): "
                    "torch would emulate bf16, which is not what `dmf bench` times")
def test_torch_bf16_autocast_is_close_to_fp32():
    import torch

    from dmf.bench.bench import synthetic_inputs
    from dmf.config import preset
    from dmf.model import DMFModel
    from dmf.torch_engine import TorchEngine

    torch.manual_seed(0)
    model = DMFModel(preset("tiny", max_audio_samples=4000), texts=["i am happy", "this is sad"],
                     pretrained=False).eval()
    batch = synthetic_inputs(input_samples=4000, max_tokens=model.model_config.max_tokens, batch=3,
                             vocab_size=len(model.tokenizer), seed=0)
    fp32 = TorchEngine(model, precision="fp32", threads=1).infer(batch)
    bf16 = TorchEngine(model, precision="bf16", threads=1).infer(batch)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == (3, len(model.model_config.labels))
    assert np.abs(bf16 - fp32).max() > 0  # bf16 really ran (not the fp32 path again)
    np.testing.assert_allclose(bf16, fp32, atol=5e-2)
