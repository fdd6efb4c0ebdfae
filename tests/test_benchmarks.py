"""The benchmarks' own options (the figures themselves are for benchmarks/, not for tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch", "4", "--vocab", "20", "--regions", "4", "--feature-dim", "8", "--lengths", "fixed:3",
        "--steps", "1", "--warmup", "0", "--threads", "1"]


def train_throughput(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), *TINY, *args],
                          capture_output=True, text=True, timeout=120)


def test_train_throughput_times_the_model_it_is_given_and_refuses_a_bad_setting_in_one_line():
    default = train_throughput()
    small = train_throughput("--model", "hidden_dim=16", "--model", "attention_dim=8")
    assert default.returncode == 0 and small.returncode == 0, default.stderr + small.stderr
    flops = [json.loads(p.stdout)["gflop_per_caption"] for p in (default, small)]
    assert flops[1] < flops[0] / 4                 # hidden 512 -> 16 and attention 512 -> 8
    for bad, says in ((["--model", "hidden=16"], "unknown setting model.hidden"),
                      (["--model", "hidden_dim"], "KEY=VALUE"),
                      (["--model", "hidden_dim=0"], "hidden_dim")):
        proc = train_throughput(*bad)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
