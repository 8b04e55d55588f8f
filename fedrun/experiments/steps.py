"""One step of an experiment (``RunSpec``), what became of it (``Outcome``) and the record it
leaves in its run directory.

A step is a ``fedrun`` training verb (``train``, ``central``, ``finetune``: a config and its
overrides) or a custom function ``"package.module:function"`` called with the spec (an audit,
a scoring, building a model). The same spec runs in this process, as ``python -m fedrun ...``
(a custom step: ``python -m fedrun.experiments.runner``) or on Slurm: a step is data only.

A step is *finished* when its run directory holds its ``outputs`` (or was restored from kept
records without them: ``fedrun.experiments.records``; and, with ``metric``, its last metrics
record has that key) and its runner record says it ran through with the same
inputs (config, overrides, params): the runner skips finished steps, which makes an
interrupted experiment resumable by running it again, and reruns changed ones. A step is
*diverged* when the run stopped itself because it cannot learn (every client update rejected
round after round: it left ``stopped.json``) with the same inputs: a result without scores,
not a crash, so the runner does not start it again either (``settled``: finished or diverged).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

CONFIG_VERBS = ("train", "central", "finetune")  # fedrun verbs taking --config and key=value
REPO = Path(__file__).resolve().parents[2]  # the checkout the subprocesses import fedrun from
RESTORED_FILE = "restored.json"  # a run restored from kept records (fedrun.experiments.records)


@dataclass
class RunSpec:
    """A step: ``kind`` (a fedrun verb or ``"module:function"``) of configuration ``name`` and
    ``seed`` in ``run_dir``, after the steps ``depends_on`` (their ``id``)."""

    name: str
    kind: str
    run_dir: Path
    seed: int = 0
    config: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # verbs: config key=value
    params: Dict[str, Any] = field(default_factory=dict)  # custom steps: their function's input
    depends_on: List[str] = field(default_factory=list)
    outputs: Tuple[str, ...] = ("final",)  # what a finished step leaves in run_dir
    metric: Optional[str] = None  # a key the last metrics.jsonl record of a finished run holds
    round_samples: Optional[int] = None  # grid runs: samples of one round (K x E x B)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.outputs = tuple(self.outputs)

    @property
    def label(self) -> str:
        """The step's short kind: the verb, or the custom function's name."""
        return self.kind.rsplit(":", 1)[-1]

    @property
    def id(self) -> str:
        return f"{self.name}/seed{self.seed}/{self.label}"

    @property
    def custom(self) -> bool:
        return self.kind not in CONFIG_VERBS

    @property
    def has_outputs(self) -> bool:
        """Its outputs are in its run directory (and its metric in the last metrics record)."""
        from fedrun.engine.metrics import read_metrics

        missing = [o for o in self.outputs if not (self.run_dir / o).exists()]
        if missing and not set(missing) <= set(self.not_kept):
            return False
        return self.metric is None or self.metric in (read_metrics(self.run_dir) or [{}])[-1]

    @property
    def not_kept(self) -> List[str]:
        """The outputs a run restored from kept records (``fedrun.experiments.records``) does
        not have: its weights were not kept."""
        path = self.run_dir / RESTORED_FILE
        return json.loads(path.read_text()).get("not_kept", []) if path.is_file() else []

    @property
    def finished(self) -> bool:
        """Its outputs are there and, when the runner recorded them, it ran through with the
        same inputs: a changed grid, or a --quick run in the same folder, is not "finished"."""
        if not self.has_outputs:
            return False
        if not self.record_path.is_file():
            return True  # made outside the runner (or by compare before it)
        return self.recorded(RAN)

    @property
    def diverged(self) -> bool:
        """It stopped itself, unable to learn, with the same inputs (its record says so and it
        left ``stopped.json``): running it again would only stop again."""
        from fedrun.engine.run import STOPPED_FILE

        return (self.run_dir / STOPPED_FILE).is_file() and self.recorded(DIVERGED)

    @property
    def settled(self) -> bool:
        """Finished or diverged: what the runner does not start again."""
        return self.finished or self.diverged

    def recorded(self, status: str) -> bool:
        """Its runner record has ``status`` and the inputs it has now."""
        if not self.record_path.is_file():
            return False
        record = json.loads(self.record_path.read_text())
        inputs = self.inputs()
        return record.get("status") == status and {key: record.get(key) for key in inputs} == inputs

    def inputs(self) -> dict:
        """What the step's results are made from, as its record stores it (JSON types)."""
        return json.loads(json.dumps({"config": self.config and str(self.config),
                                      "overrides": self.overrides, "params": self.params}))

    @property
    def log_path(self) -> Path:
        """Beside the run directory: a re-run (overwrite=true) empties the directory itself."""
        return self.run_dir.parent / f"{self.run_dir.name}.{self.label}.log"

    @property
    def record_path(self) -> Path:
        return self.run_dir / f"runner_{self.label}.json"

    @property
    def run_overrides(self) -> List[str]:
        """A verb's overrides with its run directory, started afresh (an unfinished run is redone)."""
        return [*self.overrides, f"output_dir={self.run_dir}", "overwrite=true"]

    def command(self) -> List[str]:
        """The subprocess running this step: ``python -m fedrun <verb> ...`` or the runner's
        entry point for a custom step."""
        if self.custom:
            return [sys.executable, "-m", "fedrun.experiments.runner", json.dumps(self.to_json())]
        config = ["--config", str(self.config)] if self.config else []
        return [sys.executable, "-m", "fedrun", self.kind, *config, *self.run_overrides]

    def to_json(self) -> dict:
        return {**asdict(self), "run_dir": str(self.run_dir)}


RAN, FINISHED_EARLIER, FAILED, BLOCKED, MISSING, DIVERGED = (
    "ran", "finished earlier", "failed", "not run: a step it depends on failed", "not run",
    "diverged")


@dataclass
class Outcome:
    """What became of a step in one execution; ``error`` and ``log`` say why it failed."""

    spec: RunSpec
    status: str
    wall_s: float = 0.0
    error: Optional[str] = None
    log: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return self.status in (RAN, FINISHED_EARLIER)


def blocked(spec: RunSpec, outcomes: Dict[str, Outcome]) -> Optional[Outcome]:
    """The outcome of a step whose dependency failed (or was itself not run), else None."""
    failed = [d for d in spec.depends_on if d in outcomes and not outcomes[d].ok]
    if not failed:
        return None
    return Outcome(spec, BLOCKED, error=f"'{failed[0]}' failed")


def finish(spec: RunSpec, wall_s: float, error: Optional[str], commit: Optional[str],
           log: Optional[Path] = None, say=None) -> Outcome:
    """The outcome of a step that ran (``error``: why it failed, else None), also written to its
    record; a step that returned without its outputs failed; one that stopped itself because
    it cannot learn (``stopped.json``) diverged."""
    from fedrun.engine.run import STOPPED_FILE

    if error is None and not spec.has_outputs:
        error = f"ended without its outputs {list(spec.outputs)}" + (
            f" and '{spec.metric}' in its last metrics record" if spec.metric else "")
    status = RAN if error is None else (DIVERGED if (spec.run_dir / STOPPED_FILE).is_file() else FAILED)
    outcome = Outcome(spec, status, wall_s, error, log)
    write_record(outcome, commit)
    if say is not None:
        where = f"; log {log}" if log and error else ""
        say(f"{spec.id}: {status + ': ' + error if error else 'done'} ({wall_s:.0f} s{where})")
    return outcome


def earlier(spec: RunSpec) -> Outcome:
    """The outcome of a settled step the runner skips: finished earlier, or diverged earlier
    (its recorded error and log)."""
    if spec.finished:
        return Outcome(spec, FINISHED_EARLIER)
    record = read_record(spec) or {}
    return Outcome(spec, DIVERGED, record.get("wall_s", 0.0), record.get("error"),
                   Path(record["log"]) if record.get("log") else None)


def write_record(outcome: Outcome, commit: Optional[str]) -> None:
    """RUN_DIR/runner_<kind>.json: the code (commit) the step ran with, its wall time, and its
    error and log if it failed."""
    spec = outcome.spec
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"id": spec.id, "kind": spec.kind, "status": outcome.status, "commit": commit,
              "wall_s": outcome.wall_s, "ended": time.time(), "error": outcome.error,
              "log": str(outcome.log) if outcome.log else None, **spec.inputs()}
    spec.record_path.write_text(json.dumps(record, indent=1) + "\n")


def read_record(spec: RunSpec) -> Optional[dict]:
    """The step's record, or (grid runs trained before the runner) compare's compare_run.json."""
    for path in (spec.record_path, spec.run_dir / "compare_run.json"):
        if path.is_file():
            record = json.loads(path.read_text())
            return {"ended": path.stat().st_mtime, **record}
    return None
