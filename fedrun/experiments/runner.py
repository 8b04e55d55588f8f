"""The experiment runner: ``execute(plan, jobs, backend)`` runs a list of steps
(``fedrun.experiments.steps.RunSpec``) in the order of their dependencies, skipping the
settled ones (finished, or diverged: the run stopped itself, unable to learn), and returns
each step's ``Outcome``.

Backends:

* ``inline``: one step after the other in this process (a verb as the library call ``fedrun``
  makes);
* ``processes``: up to ``jobs`` steps at once, each ``python -m fedrun <verb> ...`` (a custom
  step: ``python -m fedrun.experiments.runner <spec json>``) with one thread and its own log
  file beside its run directory;
* ``slurm``: job arrays of ``launch/slurm/sweep_array.sbatch`` (``fedrun.experiments.slurm``).

A failed step is recorded (its error and log, in its run directory's runner record) and the
others go on; the steps that depend on it are not run. Every step that runs records the commit
of the code (``fedrun.engine.metrics.code_commit``, read once before the steps) and its wall
time. A step whose dependency ran again is stale and runs again too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from importlib import import_module
from typing import Callable, Dict, List, Optional

from fedrun.errors import ConfigError, FedrunError
from fedrun.experiments.steps import DIVERGED, REPO, RESTORED_FILE, Outcome, RunSpec, blocked, earlier, finish

BACKENDS = ("inline", "processes", "slurm")


def say(message: str, who: str = "fedrun") -> None:
    """Progress of an experiment driver: timestamped, on stderr (stdout stays for results)."""
    print(f"[{who} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def execute(plan: List[RunSpec], jobs: int = 1, backend: Optional[str] = None, say=say,
            rerun: bool = False, commit: Optional[str] = None,
            on_outcome: Optional[Callable[[Outcome], None]] = None) -> Dict[str, Outcome]:
    """Run the unfinished steps of ``plan`` (all of them with ``rerun``); returns step id ->
    Outcome in plan order. ``backend`` defaults to inline for one job, processes otherwise.
    ``on_outcome`` is called in this thread with each step's outcome as the step ends (Slurm:
    as its array is collected)."""
    from fedrun.engine.metrics import code_commit

    backend = backend or ("inline" if jobs <= 1 else "processes")
    on_outcome = on_outcome or _ignore
    if backend not in BACKENDS:
        raise ConfigError(f"runner backend must be one of {list(BACKENDS)}, got '{backend}'")
    order = dependency_order(plan)
    todo = stale_steps(order, rerun)
    outcomes = {s.id: earlier(s) for s in order if s.id not in todo}
    diverged = sum(o.status == DIVERGED for o in outcomes.values())
    say(f"{len(plan)} steps ({len(outcomes) - diverged} already finished"
        + (f", {diverged} diverged earlier" if diverged else "") + f"), backend {backend}"
        + (f", {jobs} at once" if backend != "inline" else ""))
    commit = commit or code_commit()  # the code the steps run with, read before they start
    steps = []
    for spec in (s for s in order if s.id in todo):  # after a step that diverged earlier: not run
        not_run = blocked(spec, outcomes)
        if not_run is None:
            # a step restored from kept records that runs again is no longer one
            (spec.run_dir / RESTORED_FILE).unlink(missing_ok=True)
            steps.append(spec)
        else:
            outcomes[spec.id] = not_run
    if backend == "slurm":
        from fedrun.experiments.slurm import run_slurm

        ended = run_slurm(steps, max(1, jobs), commit, say)
        for outcome in ended.values():
            on_outcome(outcome)
        outcomes.update(ended)
    elif backend == "processes":
        outcomes.update(run_processes(steps, max(1, jobs), commit, say, on_outcome))
    else:
        outcomes.update(run_inline(steps, commit, say, on_outcome))
    return {s.id: outcomes[s.id] for s in plan}


def _ignore(outcome: Outcome) -> None:
    del outcome


def dependency_order(plan: List[RunSpec]) -> List[RunSpec]:
    """The steps with every step after those it depends on; refuses duplicate ids, unknown
    dependencies and cycles."""
    by_id = {}
    for spec in plan:
        if spec.id in by_id:
            raise ConfigError(f"two steps of the plan have the id '{spec.id}'")
        by_id[spec.id] = spec
    order, placed = [], set()

    def place(spec: RunSpec, path: tuple) -> None:
        if spec.id in placed:
            return
        if spec.id in path:
            raise ConfigError(f"the plan's dependencies form a cycle: {' -> '.join(path + (spec.id,))}")
        for dep in spec.depends_on:
            if dep not in by_id:
                raise ConfigError(f"step '{spec.id}' depends on '{dep}', which is not in the plan")
            place(by_id[dep], path + (spec.id,))
        placed.add(spec.id)
        order.append(spec)

    for spec in plan:
        place(spec, ())
    return order


def stale_steps(order: List[RunSpec], rerun: bool = False) -> set:
    """Ids of the steps to run: unsettled ones (neither finished nor diverged) and those after
    a step that runs."""
    todo = set()
    for spec in order:
        if rerun or not spec.settled or any(dep in todo for dep in spec.depends_on):
            todo.add(spec.id)
    return todo


# ---------------------------------------------------------------- inline

def run_inline(steps: List[RunSpec], commit: Optional[str], say,
               on_outcome: Callable[[Outcome], None] = _ignore) -> Dict[str, Outcome]:
    """Each step in this process, one after the other (the main thread: fedrun's runs may set
    signal handlers)."""
    outcomes: Dict[str, Outcome] = {}
    for spec in steps:
        outcomes[spec.id] = blocked(spec, outcomes) or _attempt(spec, commit, say, lambda: run_here(spec))
        on_outcome(outcomes[spec.id])
    return outcomes


def run_here(spec: RunSpec) -> None:
    """Run one step in this process: a verb as ``fedrun <verb>`` does (errors raise), a custom
    step by calling its function with the spec (its run directory made first)."""
    from fedrun.config import load_config

    if spec.custom:  # its function writes into its run directory
        module, _, function = spec.kind.partition(":")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        getattr(import_module(module), function)(spec)
    elif spec.kind == "central":
        from fedrun.engine.central import run_central

        run_central(load_config(spec.config, spec.run_overrides))
    else:
        from fedrun.engine import simulator

        task = "sd_lora" if spec.kind == "finetune" else None  # `fedrun finetune` is bound to it
        simulator.run(load_config(spec.config, spec.run_overrides, task=task))


def _attempt(spec: RunSpec, commit: Optional[str], say, work: Callable[[], None], log=None) -> Outcome:
    say(f"{spec.id}: started")
    started = time.perf_counter()
    error = None
    try:
        work()
    except FedrunError as exc:
        error = str(exc)
    except Exception as exc:  # a bug in one step must not stop the others: keep its traceback
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    return finish(spec, time.perf_counter() - started, error, commit, log, say)


# ---------------------------------------------------------------- processes

def run_processes(steps: List[RunSpec], jobs: int, commit: Optional[str], say,
                  on_outcome: Callable[[Outcome], None] = _ignore) -> Dict[str, Outcome]:
    """Up to ``jobs`` subprocesses at once, each step as soon as its dependencies are done."""
    outcomes: Dict[str, Outcome] = {}
    pending, running = list(steps), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for spec in [s for s in pending if _ready(s, pending, running)]:
                not_run = blocked(spec, outcomes)
                if not_run is None and len(running) >= jobs:
                    break
                pending.remove(spec)
                if not_run is not None:
                    outcomes[spec.id] = not_run
                else:
                    running[pool.submit(run_subprocess, spec, commit, say)] = spec
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                outcome = outcomes[running.pop(future).id] = future.result()
                on_outcome(outcome)
    return outcomes


def _ready(spec: RunSpec, pending: List[RunSpec], running: dict) -> bool:
    waiting = {s.id for s in pending} | {s.id for s in running.values()}
    return not waiting & set(spec.depends_on)


def run_subprocess(spec: RunSpec, commit: Optional[str], say) -> Outcome:
    """One step as a subprocess writing to its log file; a non-zero exit is its failure, told
    by the last line of the log (fedrun's one-line error)."""
    log = spec.log_path
    log.parent.mkdir(parents=True, exist_ok=True)

    def work() -> None:
        with open(log, "w") as handle:
            code = subprocess.call(spec.command(), stdout=handle, stderr=subprocess.STDOUT,
                                   env=process_env())
        if code != 0:
            raise FedrunError(f"exit code {code}: {last_line(log)}")

    return _attempt(spec, commit, say, work, log)


def process_env(extra: Optional[dict] = None) -> dict:
    """A step's environment: fedrun importable from this checkout, one OpenMP thread that does
    not spin-wait (the steps share the cores), quiet W&B."""
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_SILENT="true",
               PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))
    env.update(extra or {})
    return env


def last_line(log) -> str:
    lines = [line for line in open(log, errors="replace").read().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fedrun.experiments.runner '<spec json>'``: a custom step in a subprocess."""
    spec = RunSpec(**json.loads((argv or sys.argv[1:])[0]))
    try:
        run_here(spec)
    except FedrunError as exc:
        print(f"{spec.id}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
