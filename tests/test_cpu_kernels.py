"""The demo's one set of CPU kernels (attncap.cpu_kernels): what torch runs after pin_avx2()."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attncap import cpu_kernels

PROBE = """
import json, os, sys
from pathlib import Path
from attncap.cpu_kernels import AVX2, pin_avx2
pinned = pin_avx2(Path(sys.argv[1]))
import torch
conv = torch.nn.Conv2d(8, 8, 3).to(memory_format=torch.channels_last)  # a oneDNN kernel, in its log
conv(torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last))
print(json.dumps({"pinned": pinned, "capability": torch.backends.cpu.get_cpu_capability(),
                  "env": {k: os.environ.get(k) for k in AVX2}}))
"""


def probe(cpuinfo, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, str(cpuinfo)], capture_output=True, text=True,
                         check=True, env={**{k: v for k, v in os.environ.items() if k not in cpu_kernels.AVX2},
                                          "ONEDNN_VERBOSE": "1", **env}).stdout
    return json.loads(out.splitlines()[-1]), out


def has_avx2():
    return "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.mark.skipif(not has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_pinned_torch_runs_the_avx2_kernels_of_aten_and_onednn():
    result, log = probe("/proc/cpuinfo")
    assert result["pinned"] and result["capability"] == "AVX2", result
    assert result["env"] == cpu_kernels.AVX2
    assert "isa:Intel AVX2" in log and "isa:Intel AVX-512" not in log, log[:2000]


@pytest.mark.skipif(not has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_a_kernel_setting_of_the_user_is_kept_and_then_nothing_is_claimed():
    result, _ = probe("/proc/cpuinfo", ATEN_CPU_CAPABILITY="default")
    assert not result["pinned"] and result["capability"] == "DEFAULT"
    assert result["env"]["ATEN_CPU_CAPABILITY"] == "default" and result["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_a_cpu_without_avx2_or_without_proc_is_left_alone(tmp_path):
    old = tmp_path / "cpuinfo"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n")
    result, _ = probe(old)
    assert not result["pinned"] and result["env"] == dict.fromkeys(cpu_kernels.AVX2)
    result, _ = probe(tmp_path / "missing")
    assert not result["pinned"] and result["env"] == dict.fromkeys(cpu_kernels.AVX2)


def test_after_torch_is_loaded_nothing_is_set(monkeypatch):
    import torch  # noqa: F401  (loaded, as in this test process)

    for key in cpu_kernels.AVX2:
        monkeypatch.delenv(key, raising=False)
    assert not cpu_kernels.pin_avx2()
    assert not any(key in os.environ for key in cpu_kernels.AVX2)
