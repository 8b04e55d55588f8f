"""The launchers in launch/slurm/, submitted to a real Slurm: no mock.

A one-node cluster on localhost is started from a generated slurm.conf in a temporary folder
(munged, slurmctld and slurmd in the foreground as child processes of this test, ``SLURM_CONF``
exported for the client commands). The project's own sbatch scripts are then submitted, all at
once, for the tiny 2-rank job of ``conftest.FAULT_SHAPE``:

* ``single_node.sbatch``: one task, ``torchrun --standalone --nproc_per_node=2``;
* ``multi_node.sbatch`` with two tasks on the one node (``--nodes=1 --ntasks-per-node=2``): two
  torchrun agents of one rank each meet at a c10d rendezvous, as two nodes would;
* ``sweep_array.sbatch`` as a one-element job array picking line 1 of a sweep file;
* ``fedrun compare --backend slurm`` (``fedrun.experiments.slurm``): a tiny grid of a
  centralized and a federated run, plus one that fails, as one job array.

The jobs are awaited by polling ``scontrol show job`` (``sbatch --wait`` polls every 2-32 s) and
their run directories are compared with the same config run directly by torchrun. Only the
daemons started here are stopped. Missing Slurm packages are installed with apt-get only when
asked (CI=true or FEDRUN_INSTALL_SLURM=1, and root): otherwise, or without root, the test is
skipped with the reason; with FEDRUN_REQUIRE_SLURM=1 (CI) it fails instead.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAULT_SHAPE, REPO, TINY

pytestmark = pytest.mark.slow  # a real one-node Slurm cluster and sbatch jobs

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel"]
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
JOB_TIMEOUT_S = 420


def _unavailable(reason: str):
    if os.environ.get("FEDRUN_REQUIRE_SLURM") == "1":
        pytest.fail(f"FEDRUN_REQUIRE_SLURM=1 but the real-Slurm test cannot run: {reason}")
    pytest.skip(reason)


def _which(program):
    return shutil.which(program, path=SEARCH_PATH)


def _install_allowed() -> bool:
    """Installing system packages is for CI machines or when asked, never a side effect of a
    developer's test run."""
    return os.environ.get("CI") == "true" or os.environ.get("FEDRUN_INSTALL_SLURM") == "1"


def _ensure_slurm_installed():
    """Install Debian's Slurm and munge packages when missing and allowed (``_install_allowed``;
    root and apt-get needed)."""
    if os.geteuid() != 0:
        _unavailable("a local Slurm cluster needs root (slurmd starts jobs as their user)")
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    if not _install_allowed():
        _unavailable(f"Slurm programs {missing} are missing; set FEDRUN_INSTALL_SLURM=1 (or CI=true) "
                     f"to let this test run 'apt-get install {' '.join(PACKAGES)}'")
    if _which("apt-get") is None:
        _unavailable(f"Slurm programs {missing} are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or any(_which(p) is None for p in PROGRAMS):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        _unavailable(f"'apt-get install {' '.join(PACKAGES)}' failed: {' | '.join(tail)}")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd for NodeName=localhost, everything under one temporary folder."""

    def __init__(self):
        # munged wants every folder above its socket searchable by all (pytest's tmp is 0700).
        self.root = Path(tempfile.mkdtemp(prefix="fedrun-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons = []

    def _hardware(self):
        """CPUs and RealMemory as slurmd itself detects them (a node may not claim more)."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return int(fields["CPUs"]), int(fields["RealMemory"])

    def write_config(self):
        cpus, memory = self._hardware()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=fedrun-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName=localhost CPUs={cpus} RealMemory={memory} State=UNKNOWN
# Jobs share the cores: all the test's jobs run at once on a small machine.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _daemon(self, *cmd):
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.root))

    def start(self):
        self.write_config()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._daemon(_which("munged"), "-F", f"--key-file={key}", f"--socket={self.root}/munge.sock",
                     f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed",
                     f"--log-file={self.root}/log/munged.log")
        self._wait(lambda: (self.root / "munge.sock").exists(), "munged")
        self._daemon(_which("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._daemon(_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                   "the node to become idle")

    def _wait(self, ready, what, timeout=30):
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [d.args[0] for d in self.daemons if d.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what}: exited {dead}; logs:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").iterdir()))

    def run(self, *cmd, check=True, env=None, **kwargs):
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=env or self.env, capture_output=True,
                              text=True, check=check, **kwargs)

    def submit(self, script, options, args, env):
        proc = self.run("sbatch", "--parsable", "--time=10", *options, str(REPO / script), *args,
                        cwd=REPO, env=dict(self.env, **env), check=False)
        assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def states(self, job_id):
        """States of a job (of every task of an array job)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return [word.split("=", 1)[1] for line in out.splitlines() for word in line.split()
                if word.startswith("JobState=")]

    def wait(self, job_ids, timeout):
        deadline = time.monotonic() + timeout
        while True:
            states = {job: self.states(job) for job in job_ids}
            if all(s and not set(s) & ACTIVE for s in states.values()):
                return states
            if time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def cancel(self, job_ids):
        """Cancel what is left of these jobs and wait for them to end."""
        for job in job_ids:
            self.run("scancel", job, check=False)
        if job_ids:
            self.wait(job_ids, timeout=30)

    def stop(self):
        """Cancel every job left on this cluster, then stop the daemons started here (only those)."""
        self.run("scancel", "--user", str(os.getuid()), check=False)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The one-node cluster of this module's tests (started once, stopped after them)."""
    _ensure_slurm_installed()
    cluster = LocalSlurm()
    try:
        started = time.monotonic()
        cluster.start()
        print(f"\nreal Slurm: cluster up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_jobs(tmp_path_factory, request, slurm_cluster):
    # Only now (a skipped test must not pay for it): the same config run directly by torchrun.
    reference = request.getfixturevalue("torchrun_reference")
    work = tmp_path_factory.mktemp("slurm")
    sweep = work / "sweep.txt"
    sweep.write_text("# the sweep of this test: index 1 is the second run line\nrounds=1\n\nrounds=2\n")
    cluster = slurm_cluster
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "RUN_ROOT": str(work / "runs"),
           "HF_HUB_OFFLINE": "1", "SWEEP": str(sweep), "RDZV_PORT": str(_free_port())}
    jobs = {}
    try:
        started = time.monotonic()
        overrides = TINY + FAULT_SHAPE
        jobs["single"] = cluster.submit("launch/slurm/single_node.sbatch", [f"--output={work}/slurm-%j.out"],
                                        overrides, dict(env, NPROC_PER_NODE="2"))
        jobs["multi"] = cluster.submit("launch/slurm/multi_node.sbatch",
                                       ["--nodes=1", "--ntasks-per-node=2", f"--output={work}/slurm-%j.out"],
                                       overrides, dict(env, NPROC_PER_NODE="1"))
        jobs["sweep"] = cluster.submit("launch/slurm/sweep_array.sbatch",
                                       ["--array=1", f"--output={work}/slurm-%A_%a.out"],
                                       [o for o in overrides if not o.startswith("rounds=")],
                                       dict(env, NPROC_PER_NODE="1"))
        states = cluster.wait(list(jobs.values()), timeout=JOB_TIMEOUT_S)
        elapsed = time.monotonic() - started
        print(f"\nreal Slurm: 3 jobs ({', '.join(f'{k}={v}' for k, v in jobs.items())}) "
              f"done in {elapsed:.1f} s in all: {states}")
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(work.glob("slurm-*.out")))
        failed = {k: states[v] for k, v in jobs.items() if states[v] != ["COMPLETED"]}
        assert not failed, f"jobs not completed: {failed}\n{logs}\n{cluster.logs()}"
        yield {"runs": work / "runs", "jobs": jobs, "logs": logs, "reference": reference}
    finally:
        cluster.cancel(list(jobs.values()))


def _same_weights(run_a, run_b, round_):
    for group in ("model", "ema"):
        a = load_file(str(run_a / "checkpoints" / f"round_{round_:05d}" / f"{group}.safetensors"))
        b = load_file(str(run_b / "checkpoints" / f"round_{round_:05d}" / f"{group}.safetensors"))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), f"{group} weights differ"
    final = "final/unet/diffusion_pytorch_model.safetensors"
    if (run_a / final).is_file() and round_ == 4:
        a, b = load_file(str(run_a / final)), load_file(str(run_b / final))
        assert all(torch.equal(a[k], b[k]) for k in a), "exported pipelines differ"


def test_single_node_job_equals_torchrun(slurm_jobs):
    run_dir = slurm_jobs["runs"] / f"fedrun-{slurm_jobs['jobs']['single']}"  # named by the job id
    assert (run_dir / "final" / "model_index.json").is_file()
    _same_weights(run_dir, slurm_jobs["reference"], 4)
    assert "2 ranks" in slurm_jobs["logs"]


def test_multi_node_job_with_two_tasks_on_one_node_equals_torchrun(slurm_jobs):
    job = slurm_jobs["jobs"]["multi"]
    run_dir = slurm_jobs["runs"] / f"fedrun-{job}"
    assert f"fedrun job {job}: 2 agents x 1 ranks, rendezvous localhost:" in slurm_jobs["logs"]
    assert "rank 0/2 backend=gloo" in slurm_jobs["logs"]
    _same_weights(run_dir, slurm_jobs["reference"], 4)


def test_sweep_array_index_runs_its_line(slurm_jobs):
    run_dir = slurm_jobs["runs"] / f"fedrun-sweep-{slurm_jobs['jobs']['sweep']}_1"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["round_00001", "round_00002"]  # line 1 says rounds=2
    # One rank here, two in the reference: with two clients the sums are the same floats.
    _same_weights(run_dir, slurm_jobs["reference"], 2)


# A centralized and a federated run of the test suite's tiny model (one FID from 24 samples at
# the end), and one that fails when it starts: no such data folder.
SLURM_GRID = """
base_config: {config}
seeds: [0]
samples: 32
eval_every_samples: 32
ema_horizon_samples: 16
overrides: {overrides}
runs:
  - {{name: central, kind: central, overrides: [num_clients=2, local_steps=1]}}
  - {{name: fed, overrides: [num_clients=2, local_steps=1]}}
  - {{name: broken, overrides: [num_clients=2, local_steps=1, data.name=image_folder, data.root=/no/such/folder]}}
"""


def test_compare_slurm_backend_runs_a_grid_as_a_job_array(slurm_cluster, tmp_path, monkeypatch):
    """``fedrun compare --backend slurm --jobs 2``: the grid's runs as one array (a central line
    starts with its verb); the failed task is reported with its log; every run records the
    commit and its Slurm run time; a second call finds the finished runs and submits only the
    failed one again."""
    from fedrun.cli import main as fedrun_main
    from fedrun.engine.metrics import code_commit

    overrides = [o for o in TINY if not o.startswith("output_dir")] + [
        "eval.num_samples=24", "eval.steps=2", "eval.kid_subset_size=8", "sample.every=0",
        "checkpoint.every=0", "threads=1"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(SLURM_GRID.format(config=REPO / "configs" / "digits_fedavg.yaml",
                                      overrides=json.dumps(overrides)))
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", SEARCH_PATH)
    args = ["compare", "--grid", str(grid), "--out", str(tmp_path / "grid"), "--jobs", "2", "--backend", "slurm"]
    started = time.monotonic()
    assert fedrun_main(args) == 1  # one run failed
    print(f"\nreal Slurm: compare --backend slurm, 3 runs in {time.monotonic() - started:.1f} s")
    runs = tmp_path / "grid" / "runs"
    assert len(list((runs / "slurm").glob("slurm-*_*.out"))) == 3  # one array of three tasks
    sweep = next((runs / "slurm").glob("sweep_*.txt")).read_text().splitlines()
    assert sweep[0].startswith("central ") and sweep[1].startswith(f"{overrides[0]} ")
    for name in ("central", "fed"):
        record = json.loads((runs / name / "seed0" / f"runner_{'central' if name == 'central' else 'train'}.json").read_text())
        assert record["status"] == "ran" and record["commit"] == code_commit() and record["wall_s"] > 0
        assert (runs / name / "seed0" / "final").is_dir()
    failed = json.loads((runs / "broken" / "seed0" / "runner_train.json").read_text())
    assert failed["status"] == "failed" and failed["error"].endswith("ended FAILED")
    assert failed["log"] == str(runs / "broken" / "seed0.train.log")  # beside the run, as with processes
    assert "does not exist" in open(failed["log"]).read()  # the task's log names the error
    report = (tmp_path / "grid" / "report" / "README.md").read_text()
    assert "| broken (**failed: seed 0**) | no results |" in report and f"(log: `{failed['log']}`)" in report
    results = json.loads((tmp_path / "grid" / "report" / "results.json").read_text())
    assert {r["name"] for r in results["runs"]} == {"central", "fed"}
    assert fedrun_main(args) == 1  # again: only the failed run is submitted, an array of one
    sweeps = sorted(runs.rglob("sweep_*.txt"), key=lambda p: p.stat().st_mtime)
    assert len(sweeps) == 2 and sweeps[-1].read_text().count("\n") == 1 and "/broken/" in sweeps[-1].read_text()
