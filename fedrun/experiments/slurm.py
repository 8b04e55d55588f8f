"""The runner's Slurm backend: the steps as job arrays of ``launch/slurm/sweep_array.sbatch``.

Each wave of steps whose dependencies are done becomes one array per config file: the steps'
override lines (``[verb] key=value ...``, with their absolute run directories) are written to a
SWEEP file, submitted with ``sbatch --array=0-N%jobs --parsable`` and awaited by polling
``scontrol show job -o`` every second (``sbatch --wait`` polls every 2-32 s). A task that did
not complete, or completed without its outputs, is reported with its log file. Cluster options
(partition, account, time limit) come from sbatch's own input environment variables
(``SBATCH_PARTITION``, ``SBATCH_ACCOUNT``, ``SBATCH_TIMELIMIT``, ...). Only fedrun's config
verbs (train, central, finetune) run this way, one rank each.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fedrun.errors import ConfigError, FedrunError
from fedrun.experiments.steps import CONFIG_VERBS, REPO, Outcome, RunSpec, blocked, finish

SWEEP_SCRIPT = REPO / "launch" / "slurm" / "sweep_array.sbatch"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
POLL_S = 1.0


def run_slurm(steps: List[RunSpec], jobs: int, commit: Optional[str], say) -> Dict[str, Outcome]:
    """The steps as job arrays, wave after wave of dependencies; ``jobs`` tasks of an array at once."""
    for spec in steps:
        check_step(spec)
    outcomes: Dict[str, Outcome] = {}
    for wave in waves(steps):
        ready = []
        for spec in wave:
            not_run = blocked(spec, outcomes)
            if not_run is not None:
                outcomes[spec.id] = not_run
            else:
                ready.append(spec)
        for _, group in itertools.groupby(sorted(ready, key=lambda s: s.config), key=lambda s: s.config):
            outcomes.update(run_array(list(group), jobs, commit, say))
    return outcomes


def check_step(spec: RunSpec) -> None:
    if spec.kind not in CONFIG_VERBS or not spec.config:
        raise ConfigError(f"step '{spec.id}': the slurm backend runs the fedrun verbs {list(CONFIG_VERBS)} "
                          f"with a config file; run it with the inline or processes backend")
    spaced = [o for o in spec.overrides if len(o.split()) != 1]
    if spaced:
        raise ConfigError(f"step '{spec.id}': a sweep line cannot hold overrides with spaces {spaced}")


def waves(steps: List[RunSpec]) -> List[List[RunSpec]]:
    """The steps by dependency depth (``steps`` in dependency order): each wave after the last."""
    depth: Dict[str, int] = {}
    for spec in steps:
        depth[spec.id] = 1 + max((depth[d] for d in spec.depends_on if d in depth), default=-1)
    levels = range(max(depth.values(), default=-1) + 1)
    return [[s for s in steps if depth[s.id] == level] for level in levels]


def sweep_line(spec: RunSpec) -> str:
    """``[verb] overrides``: the run directory absolute (the job runs where it was submitted from)
    and started afresh (sweep_array.sbatch passes resume=auto; an unfinished run is redone)."""
    verb = [] if spec.kind == "train" else [spec.kind]
    return " ".join(verb + spec.overrides + [f"output_dir={spec.run_dir.resolve()}", "resume=never",
                                            "overwrite=true"])


def run_array(group: List[RunSpec], jobs: int, commit: Optional[str], say) -> Dict[str, Outcome]:
    """One job array for steps of one config; each task's outcome from its state and outputs,
    its log copied beside its run directory (where the processes backend writes it)."""
    logs = Path(os.path.commonpath([str(s.run_dir.resolve().parent) for s in group])) / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"sweep_{time.strftime('%Y%m%d-%H%M%S')}_", suffix=".txt",
                                    dir=logs)
    with os.fdopen(handle, "w") as file:
        file.write("".join(sweep_line(s) + "\n" for s in group))
    sweep = Path(name)
    job = submit(sweep, len(group), jobs, Path(group[0].config).resolve(), logs)
    say(f"slurm: array job {job}: {len(group)} runs ({sweep}), at most {jobs} at once; logs in {logs}")
    try:
        tasks = await_array(job)
    except BaseException:  # interrupted: leave nothing running on the cluster
        _slurm("scancel", job, check=False)
        raise
    outcomes = {}
    for index, spec in enumerate(group):
        state, run_s = tasks.get(index, (None, 0.0))  # None: purged, judged by its outputs
        error = None if state in ("COMPLETED", None) else f"array task {job}_{index} ended {state}"
        log = logs / f"slurm-{job}_{index}.out"
        if log.is_file():
            log = Path(shutil.copy(log, spec.log_path))
        outcomes[spec.id] = finish(spec, run_s, error, commit, log, say)
    return outcomes


def submit(sweep: Path, count: int, jobs: int, config: Path, logs: Path) -> str:
    """``sbatch --array=0-N%jobs --parsable sweep_array.sbatch``; returns the array job id."""
    # No torchrun restarts by default: a restarted worker starts the run over (resume=never),
    # which is what running the experiment again does for the failed runs.
    path = os.environ.get("PYTHONPATH")
    env = {"SWEEP": str(sweep), "CONFIG": str(config), "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "FEDRUN_ROOT": str(REPO), "OMP_NUM_THREADS": "1",
           "MAX_RESTARTS": os.environ.get("MAX_RESTARTS", "0"),
           "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
    proc = _slurm("sbatch", f"--array=0-{count - 1}%{jobs}", "--parsable",
                  f"--output={logs}/slurm-%A_%a.out", str(SWEEP_SCRIPT), env=dict(os.environ, **env),
                  check=False)
    if proc.returncode != 0:
        raise FedrunError(f"sbatch {SWEEP_SCRIPT} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def await_array(job: str) -> Dict[int, Tuple[str, float]]:
    """Poll ``scontrol show job -o`` until no task of the array is active; returns task index ->
    (final state, run seconds)."""
    while True:
        proc = _slurm("scontrol", "show", "job", "-o", job, check=False)
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:
            return {}  # the controller has forgotten the job (MinJobAge): long finished
        tasks = [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in proc.stdout.splitlines()]
        if proc.returncode == 0 and not any(t.get("JobState") in ACTIVE for t in tasks):
            return {int(t["ArrayTaskId"]): (t.get("JobState", "UNKNOWN"), run_seconds(t.get("RunTime", "0")))
                    for t in tasks if t.get("ArrayTaskId", "").isdigit()}
        time.sleep(POLL_S)


def run_seconds(text: str) -> float:
    """Slurm's ``[D-]HH:MM:SS`` as seconds."""
    days, _, clock = text.rpartition("-")
    seconds = 0.0
    for part in clock.split(":"):
        seconds = 60 * seconds + float(part)
    return seconds + 86400 * int(days or 0)


def _slurm(program: str, *args: str, check: bool = True, env: Optional[dict] = None):
    path = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin")
    if path is None:
        raise FedrunError(f"the slurm backend needs '{program}' (Slurm's client commands) on PATH")
    return subprocess.run([path, *args], capture_output=True, text=True, check=check, env=env)
