"""One set of CPU kernels for the demo, so that its figures are the same on every x86-64 CPU.

MKL's, oneDNN's and ATen's AVX-512 kernels add in another order than their AVX2 ones, and 14
epochs of training carry the last bits into the scores' third digit (README: a Zen 4 EPYC gave
BLEU-4 0.6217 with its own kernels and the first-generation EPYC's 0.6202 with AVX2 ones).

Capping MKL's instructions is not enough across vendors: an Intel Xeon held to AVX2 gave BLEU-4
0.6138 where three AMD EPYCs gave 0.6202 (README), and its matrix products there had other bits
than with its own kernels but the same as under ``MKL_CBWR=AVX2``, MKL's conditional numerical
reproducibility mode, which runs one AVX2 code path "on Intel and compatible processors". So
that is asked for too (docs/performance.md).
Imports nothing heavy: the variables must be set before torch runs its first kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2"}


def pin_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Ask MKL (its reproducible AVX2 path), oneDNN and ATen for their AVX2 kernels; True if they
    will use them.

    Only on a CPU whose flags list avx2 (ATen would run AVX2 code on any CPU it is told to), and
    only before torch is imported, as the libraries read the variables once. A variable the user
    set is kept.
    """
    if "torch" in sys.modules:
        return False
    try:
        flags = next((line.split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    if "avx2" not in flags:
        return False
    for key, value in AVX2.items():
        os.environ.setdefault(key, value)
    return all(os.environ[key] == value for key, value in AVX2.items())
