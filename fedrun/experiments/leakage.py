"""A grid's audit (grid key ``audit``): ``fedrun audit`` of every reporting run, its numbers read
back beside the run's scores, and the report's leakage table.

    audit        the runner step: ``fedrun.eval.audit.audit_run`` of a finished run (RUN/audit/)
    audit_steps  one audit step per training step, after it
    leakage      the numbers of a run's audit.json (and its final/privacy.json): MIA AUC, TPR at
                 1 % FPR, the memorised share of the samples, epsilon

The report's leakage table is ``fedrun.experiments.tables.leakage_table``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from fedrun.errors import ConfigError
from fedrun.experiments.steps import RunSpec

AUDIT_FILE = "audit/audit.json"
#: the keys ``leakage`` adds to a collected result (summarised over seeds like the scores)
LEAKAGE = ("mia_auc", "mia_tpr_at_1pct_fpr", "memorised_fraction", "epsilon", "noise_multiplier",
           "mia_members", "mia_nonmembers")


def privacy_level(s: Dict[str, Any]) -> str:
    """What a configuration's summary (metric -> (mean, std)) says of its privacy: 'dp' (an
    epsilon), 'clip' (the clip-only control: DP without noise, noise multiplier 0) or 'none'."""
    if math.isfinite(s.get("epsilon", (math.nan,))[0]):
        return "dp"
    return "clip" if s.get("noise_multiplier", (math.nan,))[0] == 0 else "none"


def check_options(options: Dict[str, Any], path: str) -> None:
    """The grid's ``audit`` section as ``fedrun.eval.audit.AuditOptions`` (errors name the key)."""
    from dataclasses import fields

    from fedrun.eval.audit import AuditOptions

    known = {f.name for f in fields(AuditOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"grid file '{path}': unknown keys {['audit.' + k for k in unknown]} "
                          f"(known: {sorted(known)})")
    try:
        AuditOptions(**options)
    except ConfigError as exc:
        raise ConfigError(f"grid file '{path}': key 'audit': {exc}") from None


def audit(spec: RunSpec) -> None:
    """Runner step: audit the finished run in ``spec.run_dir`` with the options ``spec.params``."""
    import torch

    from fedrun.eval.audit import AuditOptions, audit_run
    from fedrun.experiments.runner import say

    torch.set_num_threads(1)
    audit_run(spec.run_dir, AuditOptions(**spec.params), say=lambda m: say(m, "audit"))


def audit_steps(options: Optional[Dict[str, Any]], training: List[RunSpec]) -> List[RunSpec]:
    """An audit step after each training step (none without ``options``)."""
    if not options:
        return []
    return [RunSpec(spec.name, "fedrun.experiments.leakage:audit", spec.run_dir, seed=spec.seed,
                    params=dict(options), depends_on=[spec.id], outputs=(AUDIT_FILE,))
            for spec in training]


def leakage(run_dir: Path) -> Dict[str, Any]:
    """A run's audit numbers (empty when it has no audit): MIA AUC (and its 95 % interval), TPR
    at 1 % FPR (None when too few non-members make it the zero-false-positive point), the share
    of samples nearer a training image than the held-out images allow (memorised), and the
    epsilon of final/privacy.json (None: no DP)."""
    from fedrun.fl.privacy.accountant import PRIVACY_FILE

    out: Dict[str, Any] = {}
    path = Path(run_dir) / AUDIT_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        mia = record["membership_inference"]
        out.update({"mia_auc": mia["auc"], "mia_auc_ci95": mia.get("auc_ci95"),
                    "mia_tpr_at_1pct_fpr": (mia["tpr_at_1pct_fpr"]
                                            if mia.get("tpr_at_1pct_fpr_reliable", True) else None),
                    "mia_members": mia["members"], "mia_nonmembers": mia["nonmembers"],
                    "memorised_fraction": record["memorised"]["fraction"],
                    "pixel_median_ratio": record["pixel"]["median_ratio"]})
    privacy = Path(run_dir) / "final" / PRIVACY_FILE
    if privacy.is_file():  # epsilon null with noise_multiplier 0: the clip-only control
        report = json.loads(privacy.read_text())
        out.update(epsilon=report.get("epsilon"), noise_multiplier=report.get("noise_multiplier"))
    return out
