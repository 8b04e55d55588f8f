"""Exact aggregation's rounding: 'stochastic' (unbiased) against 'nearest' on the default job.

    python -m bench.rounding [--rounds 400] [--out docs/benchmarks/rounding] [--quick]

Trains the default job (configs/digits_fedavg.yaml: 4 clients, E = 4, 16x16 U-Net) twice, once
per ``aggregation.rounding``, as two single-process runs side by side (the experiment runner's
processes backend with 2 jobs: one thread each, started together, so both see the same machine
load; each run's log beside its directory), with FID at the end (eval.every = rounds). Writes
results.json: per run the train loss of every round, the final FID / KID with the floor, and the
round times; the round-time ratio stochastic / nearest is per round (both runs' round r), median
[min-max]. The loss comparison is the mean train loss over windows of rounds: the two runs draw
the same batches and noise, so they differ only through the rounding of the sums.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import common, configs
from fedrun.experiments.runner import execute
from fedrun.experiments.steps import RunSpec

MODES = ("stochastic", "nearest")


def _run_spec(mode: str, out: Path, rounds: int, quick: bool) -> RunSpec:
    args = configs.overrides(out / mode, quick, f"rounds={rounds}", f"aggregation.rounding={mode}",
                             f"eval.every={rounds}", "sample.every=0", "checkpoint.every=0")
    if quick:
        args += ["data.max_samples=240", "eval.num_samples=32", "eval.steps=2",
                 "eval.kid_subset_size=16"]
    return RunSpec(mode, "train", out / mode, config=configs.DIGITS, outputs=("final",), metric="fid",
                   overrides=[a for a in args if not a.startswith(("output_dir=", "overwrite="))])


def _windows(losses, size):
    return [statistics.fmean(losses[i: i + size]) for i in range(0, len(losses), size)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--out", default="runs/bench_rounding", help="folder of the two runs")
    parser.add_argument("--results", help="results folder (results.json); default: --out")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny model, seconds")
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    runs = [_run_spec(mode, out, args.rounds, args.quick) for mode in MODES]
    # every time anew (rerun): a benchmark measures, it does not resume
    outcomes = execute(runs, jobs=2, backend="processes", rerun=True, say=lambda m: None)
    for outcome in outcomes.values():
        if not outcome.ok:
            raise SystemExit(f"bench.rounding: the '{outcome.spec.name}' run failed: {outcome.error} "
                             f"(log: {outcome.log})")
    runs = {}
    for mode in MODES:
        records = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        last = records[-1]
        runs[mode] = {"train_loss": [r["train_loss"] for r in records],
                      "round_time_s": [r["round_time_s"] - r.get("eval_s", 0.0) for r in records],
                      **{k: last.get(k) for k in ("fid", "kid", "kid_std", "floor_fid", "eval_samples")}}
    window = max(1, args.rounds // 8)
    windows = {mode: _windows(runs[mode]["train_loss"], window) for mode in MODES}
    ratios = [a / b for a, b in zip(runs["stochastic"]["round_time_s"], runs["nearest"]["round_time_s"])]
    result = {
        "command": "python -m bench.rounding " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": common.git_commit(), "machine": common.machine(), "load": common.loadavg(),
        "rounds": args.rounds, "wall_s": time.perf_counter() - started, "runs": runs,
        "loss_window_rounds": window, "mean_loss_per_window": windows,
        "final_window_difference": windows["stochastic"][-1] - windows["nearest"][-1],
        "round_time_ratio_stochastic_over_nearest": common.summarize(ratios),
    }
    common.write_json(Path(args.results or out) / "results.json", result)
    for mode in MODES:
        print(f"{mode}: mean loss of the last {window} rounds {windows[mode][-1]:.5f}, FID "
              f"{runs[mode]['fid']:.3f} (floor {runs[mode]['floor_fid']:.3f})", file=sys.stderr)
    stats = result["round_time_ratio_stochastic_over_nearest"]
    print(f"round time stochastic / nearest: median {stats['median']:.3f} "
          f"[{stats['min']:.3f}-{stats['max']:.3f}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
