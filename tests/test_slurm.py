"""SLURM for real: a one-node cluster on this machine (munged, slurmctld and slurmd on loopback, in a temporary
folder) runs a grid as a job array with the metrics of a local grid, resumes a requeued task, and runs a DDP training
under `srun` with the result of Lightning's own two-process DDP. Debian's slurm-wlm and munge are installed if missing
(root with apt-get); where they cannot be, the tests skip and say why. Every daemon started here is stopped."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mars_nb.config import DataConfig, RunConfig, TrainConfig
from mars_nb.runfolder import read_log
from mars_nb.ablate import RUNNER

pytestmark = pytest.mark.slow

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
TRAIN = "import sys; from mars_nb.train import main; sys.exit(main(sys.argv[1:]))"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CONF = """\
ClusterName=marsnb
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None)


def _install() -> str | None:
    "None when the SLURM tools are here (installed now if missing and possible); otherwise why they are not."
    if all(_tool(t) for t in TOOLS): return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed, and only root with apt-get could install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        try: p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        except subprocess.TimeoutExpired: return f"{' '.join(cmd)} took more than 5 minutes"
        if p.returncode != 0: return f"{' '.join(cmd)} failed: {(p.stderr or p.stdout).strip()[-400:]}"
    missing = [t for t in TOOLS if not _tool(t)]
    return f"installed slurm-wlm and munge, but {missing} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    env: dict

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, env={**self.env, **kw.pop("env", {})},
                           timeout=timeout, **kw)
        if check: assert p.returncode == 0, f"{' '.join(cmd)}: {p.stderr[-3000:]}"
        return p

    def wait(self, job: str, timeout: float = 1200):
        "Until job `job` (an array: every task) has left the queue."
        deadline = time.time() + timeout
        while self.run("squeue", "-h", "-j", job, check=False).stdout.strip():
            assert time.time() < deadline, f"job {job} still queued after {timeout} s: {self.run('squeue').stdout}"
            time.sleep(2)

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.folder / "log").glob("*")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _install()
    if why: pytest.skip(f"no SLURM here: {why}")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"): (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(d=d, ctld_port=_free_port(), slurmd_port=_free_port(), cpus=os.cpu_count(),
                                user=subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        subprocess.run([_tool("munged"), f"--key-file={key}", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                        f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed", "--force"], check=True, env=env)
        for cmd in ([_tool("slurmctld"), "-D", "-f", str(conf)], [_tool("slurmd"), "-D", "-f", str(conf), "-N", "localhost"]):
            started.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        c = Cluster(d, env)
        deadline = time.time() + 60
        while c.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() != "idle":
            if time.time() > deadline: pytest.skip(f"the one-node SLURM did not come up within 60 s:\n{c.log()}")
            time.sleep(1)
        yield c
    finally:
        if started:
            jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, env=env).stdout.split()
            if jobs: subprocess.run(["scancel", *set(jobs)], env=env)
        for p in started:
            p.send_signal(signal.SIGTERM)
            try: p.wait(20)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
        pid = d / "munged.pid"
        if pid.exists():
            try: os.kill(int(pid.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError): pass


GRID = """\
out: {out}
datasets: [craters]
seeds: {seeds}
shared: {{steps: {steps}, crop: 64, batch_size: 2, preset: tiny, eval_angles: [0, 90], device: cpu}}
configs:
  {config}: {{mode: {config}}}
"""


def _submit(cluster: Cluster, grid: Path) -> tuple[str, str]:
    p = cluster.run(sys.executable, "-c", RUNNER, str(grid), "--slurm", "--cpus-per-run", "1", "--time", "00:30:00")
    m = re.search(r"submitted array job (\d+) \(.*\) and report job (\d+)", p.stdout)
    assert m, p.stdout
    return m.group(1), m.group(2)


def test_a_grid_runs_as_a_job_array_with_the_metrics_of_local_runs(cluster, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(out=tmp_path / "cluster", seeds=[0, 1], steps=12, config="rotaug"))
    array, report = _submit(cluster, grid)
    cluster.wait(report)
    for seed in (0, 1):
        out = (tmp_path / "cluster" / "slurm" / f"{array}_{seed}.out").read_text()
        assert (tmp_path / "cluster" / "runs" / f"craters-rotaug-s{seed}" / "done.json").exists(), out + cluster.log()
    assert (tmp_path / "cluster" / "README.md").exists(), "the report job did not write the report"
    local = subprocess.run([sys.executable, "-c", RUNNER, str(grid), "--out", str(tmp_path / "local"), "--no-report"],
                           capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=1200)
    assert local.returncode == 0, local.stderr[-3000:]
    for seed in (0, 1):
        got, want = (json.loads((tmp_path / where / "runs" / f"craters-rotaug-s{seed}" / "metrics.json").read_text())
                     for where in ("cluster", "local"))
        number = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.endswith("_seconds")}
        assert number(got) == pytest.approx(number(want), rel=1e-6, abs=1e-9), seed
        said = lambda m: {k: v for k, v in m.items() if isinstance(v, str)}
        assert said(got) == said(want)
    again = cluster.run(sys.executable, "-c", RUNNER, str(grid), "--slurm")          # nothing left to submit
    assert "every run of the grid has finished: nothing to submit" in again.stdout


def test_a_requeued_task_resumes_its_run_from_the_checkpoint(cluster, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(out=tmp_path / "cluster", seeds=[0], steps=130, config="none"))   # a checkpoint at 100
    array, report = _submit(cluster, grid)
    run = tmp_path / "cluster" / "runs" / "craters-none-s0"
    deadline = time.time() + 900
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert time.time() < deadline and cluster.run("squeue", "-h", "-j", array).stdout.strip(), cluster.log()
        time.sleep(0.5)
    cluster.run("scontrol", "requeue", f"{array}_0")                       # kills the task and queues it again
    cluster.run("scontrol", "update", f"JobId={array}_0", "StartTime=now")  # without the hold a requeue imposes
    cluster.wait(report)
    said = (tmp_path / "cluster" / "slurm" / f"{array}_0.out").read_text()
    assert "DUE TO JOB REQUEUE" in said, said
    assert (run / "done.json").exists(), said + cluster.log()
    attempts = sorted(p.parent.name for p in (run / "logs").glob("attempt*/metrics.csv"))
    assert attempts == ["attempt0", "attempt1"], attempts
    second = pd.read_csv(run / "logs" / "attempt1" / "metrics.csv")
    assert second["step"].min() >= 100 and read_log(run)["step"].max() == 129         # went on from the checkpoint


DDP = """\
import sys
from mars_nb.config import RunConfig
from mars_nb.train import fit
fit(RunConfig.from_yaml(sys.argv[1]), sys.argv[2], progress=False)
"""


def test_ddp_under_srun_trains_what_lightnings_own_two_processes_train(cluster, tmp_path):
    cfg = RunConfig(data=DataConfig(dataset="craters", crop=64, batch_size=2),
                    train=TrainConfig(mode="rotaug", steps=3, devices=2, log_every=1, ckpt_every=3, device="cpu"))
    cfg.to_yaml(tmp_path / "cfg.yaml")
    srun = cluster.run("srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", sys.executable, "-c", TRAIN,
                       str(tmp_path / "cfg.yaml"), str(tmp_path / "srun"), "--no-progress", env=ONE_THREAD, timeout=900)
    said = srun.stdout + srun.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in said and "GLOBAL_RANK: 1, MEMBER: 2/2" in said, said[-3000:]
    (tmp_path / "ddp.py").write_text(DDP)
    own = subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path / "cfg.yaml"), str(tmp_path / "own")],
                         capture_output=True, text=True, env={k: v for k, v in {**os.environ, **ONE_THREAD}.items()
                                                               if not k.startswith("SLURM")}, timeout=900)
    assert own.returncode == 0, own.stderr[-3000:]
    a, b = (load_file(str(tmp_path / w / "model.safetensors")) for w in ("srun", "own"))
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], msg=k)
    assert list(read_log(tmp_path / "srun")["step"]) == [0, 1, 2]


def test_a_task_count_that_does_not_match_the_devices_fails_loudly(cluster, tmp_path):
    cfg = RunConfig(data=DataConfig(dataset="craters", crop=64, batch_size=2),
                    train=TrainConfig(mode="none", steps=2, devices=2, device="cpu"))
    cfg.to_yaml(tmp_path / "cfg.yaml")
    p = cluster.run("srun", "--ntasks=1", sys.executable, "-c", TRAIN, str(tmp_path / "cfg.yaml"), str(tmp_path / "run"),
                    "--no-progress", check=False, timeout=600)
    assert p.returncode != 0 and "SLURM started 1 task(s) for this run, but it is configured for devices=2 x num_nodes=1" \
        in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
