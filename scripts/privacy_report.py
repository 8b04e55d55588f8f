"""The privacy-utility report (issue #11): DP-FedAvg on the digits and on the federated LoRA demo,
each audited with ``fedrun audit``, plus a deliberately overfit non-private positive control.

    python -m scripts.privacy_report --jobs 2 --results docs/results/privacy_small_population \\
        --lora-base runs/lora_demo/pretrain/final        # reuse the LoRA demo's pre-trained base
    python -m scripts.privacy_report --quick             # tiny, < 1 min, for tests

1. digits pre-training with many virtual clients (C = 500 of ~3 images, K = 10 per round: q =
   0.02), epsilon in {inf, 8, 4, 1} at delta = 1e-5 (sigma calibrated for the rounds): FID (with
   its floor) and class mix of the audit's samples, MIA AUC / TPR at 1 % FPR, memorisation
   fractions. epsilon = inf is the same federation without clipping or noise (uniform weights).
2. positive control: a non-private model overfit on 32 digits (2 clients), the same audit.
3. federated LoRA on the demo's tiny SD (16 nines, one per client, K = 4 per round: q = 0.25),
   plain LoRA vs FFA-LoRA, without DP and at epsilon = 8: nine-rate of the instance prompt's
   samples (shipped digits classifier) and the audit on the subject images vs 16 held-out nines.
   The base is ``--lora-base`` (a finished ``scripts.lora_demo`` pre-training), else it is
   pre-trained here (``--lora-pretrain-rounds``; --quick: a random tiny pipeline).

Each run is three runner steps (``fedrun.experiments.runner``): the training, its audit, the
scoring of the audit's samples; ``--jobs N`` runs N at once as processes of one thread. A re-run
skips the finished steps; a failed run is listed in the report and the others go on. Writes
RESULTS/privacy.json, RESULTS/README.md (table), RESULTS/privacy_utility.png and each audit's
closest pairs. Measured on the shared 2-core machine: the full report with --jobs 2 and
--lora-base is estimated at 25-40 min; without --lora-base add ~10 min of pre-training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

from fedrun.experiments.runner import execute, say
from fedrun.experiments.stats import describe_commits
from fedrun.experiments.steps import RunSpec, read_record
from fedrun.experiments.tables import fmt, header, row
from scripts import lora_demo

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["logging.wandb=false", "logging.progress=false", "threads=1"]
OFF = ["eval.every=0", "sample.every=0", "checkpoint.every=0", *QUIET]


def sizes(args) -> dict:
    """The report's runs (full, or --quick): override lists, epsilons, samples per audit."""
    if args.quick:
        tiny = ["data.image_size=8", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
                "model.attention_head_dim=4", "optim.batch_size=4", "sample.num_images=2",
                "sample.steps=2", "eval.steps=2", *OFF]
        return {"digits": [*tiny, "data.max_samples=240", "num_clients=20", "clients_per_round=4",
                           "rounds=2", "local_steps=1", "server.weighting=uniform"],
                "control": [*tiny, "data.max_samples=16", "data.heldout_fraction=0.5", "num_clients=2",
                            "rounds=2", "local_steps=3"],
                "lora": ["num_clients=8", "clients_per_round=2", "rounds=1", "local_steps=1",
                         "data.image_size=8", "finetune.lora_rank=2", "optim.batch_size=2",
                         "sample.num_images=1", "sample.steps=2", "server.weighting=uniform",
                         "finetune.aggregation_error_every=0", *OFF[1:]],
                "epsilons": [None, 4.0], "clip_norm": 1.0, "lora_epsilons": [None, 8.0],
                "lora_clip_norm": 0.5, "samples": 8, "lora_samples": 4, "image_size": 8, "noise_draws": 1}
    unet = ["data.image_size=8", "model.block_out_channels=[32,64]"]
    return {"digits": [*unet, f"num_clients={args.clients}", f"clients_per_round={args.clients_per_round}",
                       f"local_steps={args.local_steps}", f"rounds={args.rounds}", "optim.lr=2e-3",
                       "server.weighting=uniform", *OFF],
            "control": [*unet, "data.max_samples=64", "data.heldout_fraction=0.5", "num_clients=2",
                        "local_steps=50", f"rounds={args.control_rounds}", "optim.lr=5e-3",
                        "ema.enabled=false", *OFF],
            "lora": ["num_clients=16", "clients_per_round=4", "server.weighting=uniform",
                     "finetune.aggregation_error_every=0", *OFF[1:]],
            "epsilons": [None, 8.0, 4.0, 1.0], "clip_norm": args.clip_norm, "lora_epsilons": [None, 8.0],
            "lora_clip_norm": args.lora_clip_norm, "samples": args.samples,
            "lora_samples": args.lora_samples, "image_size": 16, "noise_draws": 2}


def _dp(epsilon: Optional[float], clip_norm: float) -> List[str]:
    if epsilon is None:
        return []
    return ["privacy.enabled=true", f"privacy.target_epsilon={epsilon}", f"privacy.clip_norm={clip_norm}"]


def _eps(epsilon: Optional[float]) -> str:
    return "inf" if epsilon is None else f"{epsilon:g}"


# ---------------------------------------------------------------- steps (in process or a subprocess)

def fid(spec: RunSpec) -> None:
    """Step: FID (with its floor) and class mix of the audit's samples -> RUN/fid.json."""
    from fedrun.eval.sampling import evaluate_run, open_run

    cfg = open_run(spec.run_dir, [f"eval.num_samples={spec.params['samples']}"])
    record = evaluate_run(spec.run_dir, cfg, samples=str(spec.run_dir / "audit" / "samples.npz"),
                          say=lambda m: say(m, "privacy_report"))
    (spec.run_dir / "fid.json").write_text(json.dumps(record, indent=1))


def nine_rate(spec: RunSpec) -> None:
    """Step: the share of the audit's samples the digits classifier calls nine -> nine_rate.json."""
    import numpy as np

    with np.load(spec.run_dir / "audit" / "samples.npz") as data:
        predicted = lora_demo.classify(data["images"].astype(np.float32) / 255.0)
    (spec.run_dir / "nine_rate.json").write_text(json.dumps(
        {"nine_rate": float((predicted == lora_demo.SUBJECT_DIGIT).mean()),
         "predictions": np.bincount(predicted, minlength=10).tolist()}))


def tiny_base(spec: RunSpec) -> None:
    """Step (--quick): a random tiny SD pipeline as the LoRA base."""
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline

    build_tiny_pipeline(spec.run_dir, block_out_channels=(16, 32), image_size=8)


def audited(train: RunSpec, score: str, **options) -> List[RunSpec]:
    """A training step, then its audit (the grids' audit step, its samples kept in
    RUN/audit/samples.npz), then ``score`` (fid or nine_rate) of the audit's samples."""
    check = RunSpec(train.name, "fedrun.experiments.leakage:audit", train.run_dir, params=options,
                    outputs=("audit/audit.json",), depends_on=[train.id])
    scoring = RunSpec(train.name, f"scripts.privacy_report:{score}", train.run_dir, depends_on=[check.id],
                      params={"samples": options["num_samples"]}, outputs=(f"{score}.json",))
    return [train, check, scoring]


def base_plan(out: Path, quick: bool, lora_base: Optional[str], pretrain_rounds: int) -> tuple:
    """(steps, path) of the LoRA base: none when given; --quick: a random tiny pipeline; else the
    LoRA demo's base and federated pre-training."""
    if lora_base:
        return [], Path(lora_base)
    if quick:
        tiny = RunSpec("lora_base", "scripts.privacy_report:tiny_base", out / "lora_base" / "tiny_sd",
                       outputs=("model_index.json",))
        return [tiny], tiny.run_dir
    prior, _ = lora_demo.write_data(out / "lora_base" / "data")
    steps = lora_demo.base_steps(out / "lora_base", prior, 300, [f"rounds={pretrain_rounds}", *OFF[1:]])
    return steps, steps[-1].run_dir / "final"


def runs_plan(out: Path, s: dict, lora_base: Path, base_ids: List[str]) -> List[List[RunSpec]]:
    """(train, audit, score) of each run: the digits runs and the control, the LoRA runs."""
    digits, runs = str(CONFIGS / "digits_fedavg.yaml"), []
    private = [(f"digits_eps{_eps(e)}", [*s["digits"], *_dp(e, s["clip_norm"])]) for e in s["epsilons"]]
    for name, overrides in [*private, ("control_overfit", s["control"])]:
        runs.append(audited(RunSpec(name, "train", out / name, config=digits, overrides=overrides), "fid",
                            num_samples=s["samples"], noise_draws=s["noise_draws"]))
    subject, heldout = lora_demo.write_nines(out / "lora_data", s["image_size"])
    for aggregation in ("fedavg", "ffa"):
        for epsilon in s["lora_epsilons"]:
            name = f"lora_{aggregation}_eps{_eps(epsilon)}"
            overrides = [*s["lora"], f"finetune.pretrained={lora_base}", f"data.root={subject}",
                         f"finetune.lora_aggregation={aggregation}", *_dp(epsilon, s["lora_clip_norm"])]
            train = RunSpec(name, "finetune", out / name, config=str(CONFIGS / "lora_digits_nine.yaml"),
                            overrides=overrides, depends_on=base_ids)
            runs.append(audited(train, "nine_rate", num_samples=s["lora_samples"], heldout=str(heldout),
                                noise_draws=s["noise_draws"]))
    return runs


# ---------------------------------------------------------------- the report

def run_row(train: RunSpec, audit_step: RunSpec, score: RunSpec) -> dict:
    """A run's line of privacy.json: the audit's numbers, its score, its steps' times."""
    a = json.loads((train.run_dir / "audit" / "audit.json").read_text())
    mia, pixel, feature, privacy = a["membership_inference"], a["pixel"], a["feature"], a["privacy"] or {}
    seconds = [(read_record(spec) or {}).get("wall_s", 0.0) for spec in (train, audit_step, score)]
    result = {"name": train.name, "run": str(train.run_dir), "epsilon": privacy.get("epsilon"),
              "noise_multiplier": privacy.get("noise_multiplier"), "mia_auc": mia["auc"],
              "mia_auc_ci95": mia.get("auc_ci95"), "mia_tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
              "mia_tpr_at_1pct_fpr_ci95": mia.get("tpr_at_1pct_fpr_ci95"),
              "mia_tpr_at_1pct_fpr_reliable": mia.get("tpr_at_1pct_fpr_reliable"),
              "mia_fpr_reached": mia.get("fpr_reached"), "mia_members": mia["members"],
              "mia_nonmembers": mia["nonmembers"], "pixel_median_ratio": pixel["median_ratio"],
              "pixel_fraction_below": pixel["fraction_below"],
              "feature_median_ratio": feature["median_ratio"], "feature_fraction_below": feature["fraction_below"],
              "memorised_by_client": a["memorised"]["by_client"], "samples": a["num_samples"],
              "train_s": seconds[0], "total_s": sum(seconds)}
    scored = json.loads((score.run_dir / f"{score.label}.json").read_text())
    if score.label == "fid":
        result.update({k: scored.get(k) for k in ("fid", "floor_fid", "class_tv", "class_fractions")})
    else:
        result.update(scored)
    return result


def _tpr(r: dict) -> str:
    """TPR at 1 % FPR, or why it is not given: with < 100 non-members the '1 % FPR' point is the
    zero-false-positive point, biased upward (``fedrun.eval.audit.mia_statistics``)."""
    if r.get("mia_tpr_at_1pct_fpr_reliable") is False:
        return f"unreliable ({r['mia_nonmembers']} non-members)"
    return fmt(r["mia_tpr_at_1pct_fpr"])


def write_results(results: Path, report: dict) -> None:
    """privacy.json, README.md (a table row per run, the failed runs listed), each audit's
    closest pairs and privacy_utility.png (digits: FID and MIA AUC vs epsilon)."""
    from fedrun.experiments.plots import pyplot, save_figure

    results.mkdir(parents=True, exist_ok=True)
    (results / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    runs = report["runs"]
    lines = [f"# Privacy-utility report{' (quick)' if report['quick'] else ''}", "",
             f"Code {report['commit']}; `{report['command']}`; {report['total_s'] / 60:.1f} min with "
             f"{report['jobs']} job(s). delta = 1e-5; epsilon from dp_accounting (RDP).", "",
             *header("run", "ε", "σ", "FID (floor)", "class TV", "nine-rate", "MIA AUC [95 % CI]",
                     "TPR@1%FPR", "median ratio px / feat", "< 0.5 px", "< 0.8 px")]
    for r in runs:
        shutil.copy(Path(r["run"]) / "audit" / "closest_pairs.png", results / f"{r['name']}_closest_pairs.png")
        ci = r.get("mia_auc_ci95")
        lines.append(row(r["name"], fmt(r["epsilon"]), fmt(r["noise_multiplier"]),
                         f"{fmt(r['fid'])} ({fmt(r['floor_fid'])})" if "fid" in r else "–",
                         fmt(r.get("class_tv")), fmt(r.get("nine_rate")),
                         fmt(r["mia_auc"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""), _tpr(r),
                         f"{fmt(r['pixel_median_ratio'])} / {fmt(r['feature_median_ratio'])}",
                         *(fmt(r["pixel_fraction_below"].get(t)) for t in ("0.5", "0.8"))))
    lines += ["", *[f"- **{f['name']}: {f['status']}**: {f['error']}"
                    + (f" (log: `{f['log']}`)" if f["log"] else "") for f in report["failed"]]]
    (results / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    digits = [r for r in runs if r["name"].startswith("digits_")]
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4))
    labels = [fmt(r["epsilon"]) if r["epsilon"] is not None else "∞" for r in digits]
    axes[0].bar(labels, [r["fid"] for r in digits], color="tab:blue")
    axes[0].set_title("digits: FID vs ε")
    axes[1].bar(labels, [r["mia_auc"] for r in digits], color="tab:red")
    axes[1].axhline(0.5, color="grey", linestyle=":")
    axes[1].set_title("digits: membership-inference AUC vs ε")
    for ax in axes:
        ax.set_xlabel("ε (δ = 1e-5)")
    save_figure(fig, results / "privacy_utility.png")


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/privacy", help="folder of the runs")
    parser.add_argument("--results", default=None, help="report folder (default OUT/report)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 1 min), for tests")
    parser.add_argument("--jobs", type=int, default=1, help="steps at once (separate processes)")
    parser.add_argument("--backend", choices=["inline", "processes"], help="default: inline for --jobs 1")
    parser.add_argument("--lora-base", help="a pre-trained tiny SD pipeline (lora_demo's pretrain/final)")
    parser.add_argument("--lora-pretrain-rounds", type=int, default=60)
    for flag, default in (("clients", 500), ("clients-per-round", 10), ("local-steps", 2), ("rounds", 250),
                          ("control-rounds", 40), ("samples", 1000), ("lora-samples", 500)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lora-clip-norm", type=float, default=0.5)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = arguments(argv)
    out, s, started = Path(args.out), sizes(args), time.perf_counter()
    results = Path(args.results) if args.results else out / "report"
    base, lora_base = base_plan(out, args.quick, args.lora_base, args.lora_pretrain_rounds)
    runs = runs_plan(out, s, lora_base, [spec.id for spec in base])
    outcomes = execute(base + [spec for run in runs for spec in run], max(1, args.jobs), args.backend,
                       say=lambda m: say(m, "privacy_report"))
    ok = [run for run in runs if all(outcomes[spec.id].ok for spec in run)]
    failed = [o for o in outcomes.values() if not o.ok]
    report = {"commit": describe_commits([read_record(spec) for run in ok for spec in run]),
              "command": " ".join(["python -m scripts.privacy_report", *(sys.argv[1:] if argv is None else argv)]),
              "quick": args.quick, "jobs": args.jobs, "lora_base": str(lora_base),
              "total_s": time.perf_counter() - started, "plan": {**s, "delta": 1e-5},
              "runs": [run_row(*run) for run in ok],
              "failed": [{"name": o.spec.name, "status": o.status, "error": o.error,
                          "log": str(o.log) if o.log else None} for o in failed]}
    write_results(results, report)
    say(f"report: {results} ({report['total_s'] / 60:.1f} min; {len(failed)} failed)", "privacy_report")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
