"""The SLURM job scripts in jobs/, run by bash with a fake SLURM: environment variables as SLURM sets
them, and tiny ``scontrol``/``srun``/``torchrun``/``attncap`` scripts that record how they are called.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"

FAKES = {
    # scontrol: expands the node list the test chose; records requeue requests
    "bin/scontrol": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTNAMES; fi
""",
    # srun: one task per node, one after the other, each with the SLURM_NODEID slurmstepd would set
    "bin/srun": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/srun"
while [ "${1#-}" != "$1" ]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?
done
""",
    "venv/bin/torchrun": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/torchrun"
""",
    # attncap: records its arguments; the stage named FAKE_BLOCK waits for SIGTERM and exits 75 as
    # `attncap train` does after its checkpoint; the stage named FAKE_FAIL exits with FAKE_STATUS
    "venv/bin/attncap": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/attncap"
if [ "$1" = "${FAKE_FAIL:-}" ]; then exit "$FAKE_STATUS"; fi
if [ "$1" = "${FAKE_BLOCK:-}" ]; then
    trap 'echo "$1 stopped by TERM" >> "$FAKE_LOG/attncap"; exit 75' TERM
    touch "$FAKE_LOG/blocked"
    while :; do sleep 0.05; done
fi
""",
}


@pytest.fixture()
def cluster(tmp_path):
    """A fake cluster: returns (environment for the job script, folder of the call logs)."""
    for name, text in FAKES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NPROC_", "ATTNCAP_"))}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", FAKE_LOG=str(log), ATTNCAP_VENV=str(tmp_path / "venv"),
               RUN=str(tmp_path / "run"), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="attncap", SLURM_JOB_NODELIST="gpu[01-02]", FAKE_HOSTNAMES="gpu01 gpu02",
               SLURM_NNODES="2", SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_GPUS_ON_NODE="4",
               SLURM_CPUS_PER_TASK="16")
    return env, log


def lines(log: Path, name: str) -> list[str]:
    path = log / name
    return path.read_text().splitlines() if path.exists() else []


def run_job(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(JOBS / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_multinode_job_derives_each_nodes_torchrun_arguments(cluster):
    env, log = cluster
    done = run_job("train_multinode.sbatch", env, "--set", "train.epochs=3")
    assert done.returncode == 0, done.stderr
    assert lines(log, "scontrol") == ["show hostnames gpu[01-02]"] * 2  # once per node, no requeue
    assert len(lines(log, "srun")) == 1 and "--kill-on-bad-exit=1" in lines(log, "srun")[0]
    calls = lines(log, "torchrun")
    assert len(calls) == 2
    for node, call in enumerate(calls):
        assert call.split() == [
            "--nnodes=2", "--nproc-per-node=4", f"--node-rank={node}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu01:24242", "--rdzv-id=4242", "--max-restarts=0",
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "-m", "attncap.cli", "--", "train", "--run", env["RUN"], "--set", "train.epochs=3"]


def test_one_node_job_uses_that_node_and_the_port_and_processes_asked_for(cluster):
    env, log = cluster
    env.update(SLURM_JOB_NODELIST="node7", FAKE_HOSTNAMES="node7", SLURM_NNODES="1", SLURM_NTASKS="1",
               SLURM_GPUS_ON_NODE="8", MASTER_PORT="29999")
    done = run_job("train.sbatch", env)
    assert done.returncode == 0, done.stderr
    (call,) = lines(log, "torchrun")
    assert {"--nnodes=1", "--nproc-per-node=8", "--node-rank=0", "--rdzv-endpoint=node7:29999"} <= set(call.split())
    env.update(NPROC_PER_NODE="2")
    run_job("train.sbatch", env)
    assert "--nproc-per-node=2" in lines(log, "torchrun")[1].split()


def test_pipeline_runs_every_stage_in_order(cluster):
    env, log = cluster
    done = run_job("pipeline.sbatch", env, "--config", "c.toml")
    assert done.returncode == 0, done.stderr
    assert lines(log, "attncap") == [f"{stage} --run {env['RUN']} --config c.toml"
                                     for stage in ("prepare", "features", "train", "evaluate")]
    assert lines(log, "scontrol") == []
    assert f"run {env['RUN']}" in done.stdout


def test_signal_to_the_batch_shell_checkpoints_the_stage_and_requeues(cluster):
    env, log = cluster
    env.update(FAKE_BLOCK="train")
    job = subprocess.Popen(["bash", str(JOBS / "pipeline.sbatch")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log / "blocked").exists():  # the fake train stage is running and waits for SIGTERM
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else ""
            time.sleep(0.01)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:  # the script failed to stop: end it and its stage, then fail
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, out
    stages = lines(log, "attncap")
    assert [s.split()[0] for s in stages] == ["prepare", "features", "train", "train"]
    assert stages[-1] == "train stopped by TERM"  # evaluate did not run
    assert lines(log, "scontrol") == ["requeue 4242"]
    assert "got SIGUSR1" in out and "requeueing job 4242" in out


@pytest.mark.parametrize("status, requeued", [(3, False), (75, True)])
def test_failed_stage_stops_the_job_and_only_a_checkpointed_stop_requeues(cluster, status, requeued):
    env, log = cluster
    env.update(FAKE_FAIL="features", FAKE_STATUS=str(status))
    done = run_job("pipeline.sbatch", env)
    assert [s.split()[0] for s in lines(log, "attncap")] == ["prepare", "features"]
    assert lines(log, "scontrol") == (["requeue 4242"] if requeued else [])
    assert done.returncode == (0 if requeued else status)


def test_missing_environment_is_one_clear_error(cluster, tmp_path):
    env, log = cluster
    env.update(ATTNCAP_VENV=str(tmp_path / "nowhere"))
    done = run_job("pipeline.sbatch", env)
    assert done.returncode == 2 and "no attncap in ATTNCAP_VENV" in done.stderr
    assert lines(log, "attncap") == []


@pytest.mark.parametrize("script", ["pipeline.sbatch", "train.sbatch", "train_multinode.sbatch"])
def test_job_headers_requeue_signal_and_log_per_job_with_nothing_site_specific(script):
    header = [l for l in (JOBS / script).read_text().splitlines() if l.startswith("#SBATCH")]
    options = {l.split()[1].split("=")[0]: l.split()[1] for l in header}
    assert options["--requeue"] == "--requeue"
    assert options["--signal"] == "--signal=B:USR1@120"
    assert options["--output"] == "--output=logs/%x-%j.out" and options["--open-mode"] == "--open-mode=append"
    assert not {"--account", "--partition", "--nodelist", "--mail-user", "--chdir"} & options.keys()
    text = (JOBS / script).read_text()
    assert not re.search(r"/home/|/Users/|/scratch/", text)
    first_command = next(i for i, l in enumerate(text.splitlines()) if l and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))
