"""The privacy-utility report (issue #11): DP-FedAvg on the digits and on the federated LoRA demo,
each audited with ``fedrun audit``, plus a deliberately overfit non-private positive control.

    python -m scripts.privacy_report --jobs 2 --results docs/results/privacy \\
        --lora-base runs/lora_demo/pretrain/final        # reuse the LoRA demo's pre-trained base
    python -m scripts.privacy_report --quick             # tiny, < 1 min, for tests

1. digits pre-training with many virtual clients (C = 500 of ~3 images, K = 10 per round: q =
   0.02), epsilon in {inf, 8, 4, 1} at delta = 1e-5 (sigma calibrated for the rounds): FID (with
   its floor) and class mix of the audit's samples, MIA AUC / TPR at 1 % FPR, memorisation
   fractions. epsilon = inf is the same federation without clipping or noise (uniform weights).
2. positive control: a non-private model overfit on 32 digits (2 clients), the same audit: it
   shows what the audit reports when there is something to find.
3. federated LoRA on the demo's tiny SD (16 nines, one per client, K = 4 per round: q = 0.25),
   plain LoRA vs FFA-LoRA, without DP and at epsilon = 8: nine-rate of the instance prompt's
   samples (shipped digits classifier) and the audit on the subject images vs 16 held-out nines.
   The base is ``--lora-base`` (a finished ``scripts.lora_demo`` pre-training), else it is
   pre-trained here with ``--lora-pretrain-rounds`` rounds.

Writes RESULTS/privacy.json, RESULTS/README.md (table), RESULTS/privacy_utility.png and each
audit's closest pairs; records the commit (``fedrun.engine.metrics.code_commit``) read before the runs.
``--jobs N`` runs N jobs at once in separate processes, one thread each. Measured on the 2-core
machine while it was shared (load ~3): a digits round (~10 clients x 2 steps) 1.7 s, 200 audit
samples ~30 s; the full report with --jobs 2 and --lora-base is estimated at 25-40 min
(4 digits jobs of ~7-10 min, the control ~8 min, 4 LoRA jobs of ~4-5 min); without --lora-base
add ~10 min of pre-training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.wandb=false", "logging.progress=false", "threads=1"]


@dataclass
class Plan:
    """The report's sizes (full, or the --quick variant)."""

    digits: List[str]
    epsilons: List[Optional[float]]
    clip_norm: float
    control: List[str]
    lora: List[str]
    lora_epsilons: List[Optional[float]]
    lora_clip_norm: float
    lora_aggregations: List[str]
    samples: int
    lora_samples: int
    image_size: int
    noise_draws: int = 2
    extra: Dict[str, object] = field(default_factory=dict)


def full_plan(args) -> Plan:
    digits = ["data.image_size=8", "model.block_out_channels=[32,64]", f"num_clients={args.clients}",
              f"clients_per_round={args.clients_per_round}", f"local_steps={args.local_steps}",
              f"rounds={args.rounds}", "optim.lr=2e-3", "server.weighting=uniform",
              "eval.every=0", "sample.every=0", "checkpoint.every=0", *QUIET]
    control = ["data.image_size=8", "model.block_out_channels=[32,64]", "data.max_samples=64",
               "data.heldout_fraction=0.5", "num_clients=2", "local_steps=50",
               f"rounds={args.control_rounds}", "optim.lr=5e-3", "ema.enabled=false",
               "eval.every=0", "sample.every=0", "checkpoint.every=0", *QUIET]
    lora = ["num_clients=16", "clients_per_round=4", "server.weighting=uniform", "sample.every=0",
            "checkpoint.every=0", "finetune.aggregation_error_every=0", *QUIET]
    return Plan(digits, [None, 8.0, 4.0, 1.0], args.clip_norm, control, lora, [None, 8.0],
                args.lora_clip_norm, ["fedavg", "ffa"], args.samples, args.lora_samples, 16)


def quick_plan(args) -> Plan:
    tiny = ["data.image_size=8", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
            "model.attention_head_dim=4", "optim.batch_size=4", "sample.num_images=2",
            "sample.steps=2", "eval.steps=2", "eval.every=0", "sample.every=0", *QUIET]
    digits = [*tiny, "data.max_samples=240", "num_clients=20", "clients_per_round=4", "rounds=2",
              "local_steps=1", "server.weighting=uniform"]
    control = [*tiny, "data.max_samples=16", "data.heldout_fraction=0.5", "num_clients=2",
               "rounds=2", "local_steps=3"]
    lora = ["num_clients=8", "clients_per_round=2", "rounds=1", "local_steps=1", "data.image_size=8",
            "finetune.lora_rank=2", "optim.batch_size=2", "sample.num_images=1", "sample.steps=2",
            "server.weighting=uniform", "sample.every=0", "checkpoint.every=0",
            "finetune.aggregation_error_every=0", *QUIET]
    return Plan(digits, [None, 4.0], 1.0, control, lora, [None, 8.0], 0.5, ["fedavg", "ffa"],
                8, 4, 8, noise_draws=1)


def _say(message: str) -> None:
    print(f"[privacy_report {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _dp(epsilon: Optional[float], clip_norm: float) -> List[str]:
    if epsilon is None:
        return []
    return ["privacy.enabled=true", f"privacy.target_epsilon={epsilon}", f"privacy.clip_norm={clip_norm}"]


# ---------------------------------------------------------------- jobs (run in workers)

def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def digits_job(name: str, overrides: List[str], samples: int, noise_draws: int) -> dict:
    """Train a digits run, audit it (its samples are kept), score those samples (FID, class mix)."""
    from fedrun.engine import simulator
    from fedrun.eval.audit import AuditOptions, audit_run
    from fedrun.config import load_config
    from fedrun.eval.sampling import evaluate_run, open_run

    _one_thread()
    started = time.perf_counter()
    cfg = load_config(str(REPO / "configs" / "digits_fedavg.yaml"), overrides)
    run_dir = simulator.run(cfg)
    trained = time.perf_counter()
    audit = audit_run(run_dir, AuditOptions(num_samples=samples, noise_draws=noise_draws), say=_say)
    evaluation = evaluate_run(run_dir, open_run(run_dir, [f"eval.num_samples={samples}"]),
                              samples=str(run_dir / "audit" / "samples.npz"), say=_say)
    return {"name": name, "run": str(run_dir), "audit": audit, "evaluation": evaluation,
            "train_s": trained - started, "total_s": time.perf_counter() - started}


def lora_base_job(out: str, quick: bool, pretrain_rounds: int) -> str:
    """The pre-trained tiny SD pipeline (quick: a random tiny one, no training)."""
    from scripts import lora_demo
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline

    _one_thread()
    out_dir = Path(out)
    if quick:
        return str(build_tiny_pipeline(out_dir / "tiny_sd", block_out_channels=(16, 32), image_size=8))
    prior, _ = lora_demo.write_data(out_dir / "data")
    lora_demo.build_base(out_dir / "base_init", prior, vae_steps=300)
    lora_demo.run_finetune("lora_digits_pretrain.yaml", [
        f"finetune.pretrained={out_dir / 'base_init'}", f"data.root={prior}",
        f"output_dir={out_dir / 'pretrain'}", "overwrite=true", f"rounds={pretrain_rounds}",
        "sample.every=0", "checkpoint.every=0", *QUIET])
    return str(out_dir / "pretrain" / "final")


def lora_job(name: str, overrides: List[str], samples: int, heldout: str, noise_draws: int) -> dict:
    """Federated LoRA on the nines, audited against held-out nines; nine-rate of its samples."""
    from fedrun.engine import simulator
    from fedrun.eval.audit import AuditOptions, audit_run
    from fedrun.config import load_config
    from fedrun.tasks.sd_lora.task import FinetuneTask
    from scripts.lora_demo import SUBJECT_DIGIT, classify

    _one_thread()
    started = time.perf_counter()
    cfg = load_config(str(REPO / "configs" / "lora_digits_nine.yaml"), overrides)
    run_dir = simulator.run(cfg, FinetuneTask(cfg))
    trained = time.perf_counter()
    audit = audit_run(run_dir, AuditOptions(num_samples=samples, noise_draws=noise_draws,
                                            heldout=heldout), say=_say)
    with np.load(run_dir / "audit" / "samples.npz") as data:
        images = data["images"].astype(np.float32) / 255.0
    predicted = classify(images)
    return {"name": name, "run": str(run_dir), "audit": audit,
            "nine_rate": float((predicted == SUBJECT_DIGIT).mean()),
            "predictions": np.bincount(predicted, minlength=10).tolist(),
            "train_s": trained - started, "total_s": time.perf_counter() - started}


def write_nines(root: Path, image_size: int, count: int = 16, seed: int = 0) -> tuple:
    """(subject, heldout) folders of ``count`` nines each: the subject is the LoRA demo's choice
    (same seeded draw), the held-out nines are others of the same class."""
    import torch
    from PIL import Image

    from fedrun.config import DataConfig
    from fedrun.data import build_datasets
    from scripts.lora_demo import SUBJECT_DIGIT

    data, _ = build_datasets(DataConfig(image_size=image_size, heldout_fraction=0.0), seed)
    nines = np.flatnonzero(data.labels == SUBJECT_DIGIT)
    subject = np.sort(np.random.default_rng([seed, 9]).choice(nines, count, replace=False))
    rest = np.setdiff1d(nines, subject)
    heldout = np.sort(np.random.default_rng([seed, 10]).choice(rest, count, replace=False))
    folders = []
    for name, chosen in (("nine", subject), ("nine_heldout", heldout)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            pixels = ((data.get_batch([i])[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i:04d}.png")
        folders.append(folder)
    return tuple(folders)


# ---------------------------------------------------------------- orchestration

class _Inline:
    """An executor that runs each job at once in this process (--jobs 1)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def run_report(out: Path, results: Path, plan: Plan, jobs: int, quick: bool,
               lora_base: Optional[str], pretrain_rounds: int, command: str) -> dict:
    from fedrun.engine.metrics import code_commit

    commit = code_commit()  # the code that produces the numbers, read before the runs
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    executor = _Inline() if jobs == 1 else ProcessPoolExecutor(
        jobs, mp_context=__import__("multiprocessing").get_context("spawn"))
    try:
        # Step 1: the LoRA base first (the LoRA runs wait for it), then the digits runs.
        base = None if lora_base else executor.submit(lora_base_job, str(out / "lora_base"), quick,
                                                      pretrain_rounds)
        digits = []
        for epsilon in plan.epsilons:
            name = f"digits_eps{'inf' if epsilon is None else f'{epsilon:g}'}"
            overrides = [*plan.digits, *_dp(epsilon, plan.clip_norm), f"output_dir={out / name}",
                         "overwrite=true"]
            digits.append(executor.submit(digits_job, name, overrides, plan.samples, plan.noise_draws))
        control = executor.submit(digits_job, "control_overfit",
                                  [*plan.control, f"output_dir={out / 'control_overfit'}",
                                   "overwrite=true"], plan.samples, plan.noise_draws)
        # Step 2: federated LoRA, plain and FFA, with and without DP
        base_dir = lora_base or base.result()
        subject, heldout = write_nines(out / "lora_data", plan.image_size)
        lora = []
        for aggregation in plan.lora_aggregations:
            for epsilon in plan.lora_epsilons:
                name = f"lora_{aggregation}_eps{'inf' if epsilon is None else f'{epsilon:g}'}"
                overrides = [*plan.lora, f"finetune.pretrained={base_dir}", f"data.root={subject}",
                             f"finetune.lora_aggregation={aggregation}",
                             *_dp(epsilon, plan.lora_clip_norm), f"output_dir={out / name}",
                             "overwrite=true"]
                lora.append(executor.submit(lora_job, name, overrides, plan.lora_samples,
                                            str(heldout), plan.noise_draws))
        rows = [f.result() for f in digits] + [control.result()] + [f.result() for f in lora]
    finally:
        executor.shutdown(wait=True)
    report = {"commit": commit, "command": command, "quick": quick, "jobs": jobs,
              "lora_base": str(base_dir), "total_s": time.perf_counter() - started,
              "plan": {"digits": plan.digits, "epsilons": plan.epsilons, "clip_norm": plan.clip_norm,
                       "control": plan.control, "lora": plan.lora, "lora_epsilons": plan.lora_epsilons,
                       "lora_clip_norm": plan.lora_clip_norm, "samples": plan.samples,
                       "lora_samples": plan.lora_samples, "delta": 1e-5},
              "runs": [_row(r) for r in rows]}
    write_results(results, report, rows)
    return report


def _row(result: dict) -> dict:
    audit = result["audit"]
    mia, pixel, feature = audit["membership_inference"], audit["pixel"], audit["feature"]
    row = {"name": result["name"], "run": result["run"],
           "epsilon": (audit["privacy"] or {}).get("epsilon"),
           "noise_multiplier": (audit["privacy"] or {}).get("noise_multiplier"),
           "mia_auc": mia["auc"], "mia_auc_ci95": mia.get("auc_ci95"),
           "mia_tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
           "mia_tpr_at_1pct_fpr_ci95": mia.get("tpr_at_1pct_fpr_ci95"),
           "mia_tpr_at_1pct_fpr_reliable": mia.get("tpr_at_1pct_fpr_reliable"),
           "mia_fpr_reached": mia.get("fpr_reached"),
           "mia_members": mia["members"], "mia_nonmembers": mia["nonmembers"],
           "pixel_median_ratio": pixel["median_ratio"], "pixel_fraction_below": pixel["fraction_below"],
           "feature_median_ratio": feature["median_ratio"],
           "feature_fraction_below": feature["fraction_below"],
           "memorised_by_client": audit["memorised"]["by_client"],
           "samples": audit["num_samples"], "train_s": result["train_s"], "total_s": result["total_s"]}
    if "evaluation" in result:
        e = result["evaluation"]
        row.update({"fid": e["fid"], "floor_fid": e["floor_fid"], "class_tv": e.get("class_tv"),
                    "class_fractions": e.get("class_fractions")})
    if "nine_rate" in result:
        row.update({"nine_rate": result["nine_rate"], "predictions": result["predictions"]})
    return row


def _auc(row: dict) -> str:
    ci = row.get("mia_auc_ci95")
    return _fmt(row["mia_auc"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _tpr(row: dict) -> str:
    """TPR at 1 % FPR, or why it is not given: with < 100 non-members the '1 % FPR' point is the
    zero-false-positive point, biased upward (``fedrun.eval.audit.mia_statistics``)."""
    if row.get("mia_tpr_at_1pct_fpr_reliable") is False:
        return f"unreliable ({row['mia_nonmembers']} non-members)"
    return _fmt(row["mia_tpr_at_1pct_fpr"])


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}g}"
    return str(value)


def write_results(results: Path, report: dict, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    (results / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        pairs = Path(row["run"]) / "audit" / "closest_pairs.png"
        if pairs.is_file():
            shutil.copy(pairs, results / f"{row['name']}_closest_pairs.png")
    runs = report["runs"]
    lines = [f"# Privacy-utility report{' (quick)' if report['quick'] else ''}", "",
             f"Code {report['commit']}; `{report['command']}`; {report['total_s'] / 60:.1f} min with "
             f"{report['jobs']} job(s). delta = 1e-5; epsilon from dp_accounting (RDP).", "",
             "| run | ε | σ | FID (floor) | class TV | nine-rate | MIA AUC [95 % CI] | TPR@1%FPR | median ratio px / feat "
             "| < 0.5 px | < 0.8 px |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        fid = f"{_fmt(r.get('fid'))} ({_fmt(r.get('floor_fid'))})" if "fid" in r else "–"
        lines.append(
            f"| {r['name']} | {_fmt(r['epsilon'])} | {_fmt(r['noise_multiplier'])} | {fid} | "
            f"{_fmt(r.get('class_tv'))} | {_fmt(r.get('nine_rate'))} | {_auc(r)} | "
            f"{_tpr(r)} | {_fmt(r['pixel_median_ratio'])} / "
            f"{_fmt(r['feature_median_ratio'])} | {_fmt(r['pixel_fraction_below'].get('0.5'))} | "
            f"{_fmt(r['pixel_fraction_below'].get('0.8'))} |")
    (results / "README.md").write_text("\n".join(lines) + "\n")
    digits = [r for r in runs if r["name"].startswith("digits_")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [_fmt(r["epsilon"]) if r["epsilon"] is not None else "∞" for r in digits]
    axes[0].bar(labels, [r["fid"] for r in digits], color="tab:blue")
    axes[0].set_title("digits: FID vs ε")
    axes[1].bar(labels, [r["mia_auc"] for r in digits], color="tab:red")
    axes[1].axhline(0.5, color="grey", linestyle=":")
    axes[1].set_title("digits: membership-inference AUC vs ε")
    for ax in axes:
        ax.set_xlabel("ε (δ = 1e-5)")
    fig.tight_layout()
    fig.savefig(results / "privacy_utility.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/privacy", help="folder of the runs")
    parser.add_argument("--results", default=None, help="report folder (default OUT/report)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 1 min), for tests")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once (separate processes)")
    parser.add_argument("--lora-base", help="a pre-trained tiny SD pipeline (lora_demo's pretrain/final)")
    parser.add_argument("--lora-pretrain-rounds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=250)
    parser.add_argument("--control-rounds", type=int, default=40)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lora-clip-norm", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=1000, help="audit/FID samples per digits run")
    parser.add_argument("--lora-samples", type=int, default=500, help="audit samples per LoRA run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    plan = quick_plan(args) if args.quick else full_plan(args)
    out = Path(args.out)
    results = Path(args.results) if args.results else out / "report"
    command = "python -m scripts.privacy_report " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_report(out, results, plan, max(1, args.jobs), args.quick, args.lora_base,
                        args.lora_pretrain_rounds, command.strip())
    _say(f"report: {results} ({report['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
