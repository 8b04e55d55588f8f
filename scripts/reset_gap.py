"""How much of federated training's gap to centralized the client optimizer resets explain, from
a collected optimizer-reset study (``configs/grids/optimizer_reset.yaml``):

    python -m scripts.reset_gap docs/results/optimizer_reset/results.json [--metric fid] [--out FILE]

Per reporting seed s (the same seeds for every run: paired):
    gap(s)    = metric(C4-E4, s) - metric(central, s)          (fresh client AdamW every round)
    closed(s) = metric(C4-E4, s) - metric(C4-E4-stateful, s)   (what keeping the state recovers)
    rest(s)   = metric(C4-E4-stateful, s) - metric(central, s) (what the federation itself costs)
The share of the gap closed is mean(closed) / mean(gap), with Fieller's 95 % interval
(``fedrun.experiments.stats.fieller_ratio``); each difference gets its paired t interval. Prints
a Markdown table and writes the numbers as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedrun.experiments.stats import fieller_ratio, paired_t
from fedrun.experiments.tables import fmt

RUNS = ("central", "C4-E4", "C4-E4-stateful")


def per_seed(results: dict, metric: str) -> dict:
    """run name -> seed -> metric, the reporting runs only (names carry their tuned point after @)."""
    out = {name: {} for name in RUNS}
    for run in results["runs"]:
        name = run["name"].split("@")[0]
        if name in out and run.get(metric) is not None:
            out[name][run["seed"]] = run[metric]
    return out


def split_gap(results: dict, metric: str = "fid") -> dict:
    values = per_seed(results, metric)
    seeds = sorted(set.intersection(*(set(v) for v in values.values())))
    if len(seeds) < 2:
        raise SystemExit(f"reset_gap: need at least 2 seeds with results for every one of {RUNS}, "
                         f"got {seeds}")
    central, fresh, stateful = ([values[name][s] for s in seeds] for name in RUNS)
    gap, closed, rest = paired_t(fresh, central), paired_t(fresh, stateful), paired_t(stateful, central)
    share = fieller_ratio([f - k for f, k in zip(fresh, stateful)], [f - c for f, c in zip(fresh, central)])
    return {"metric": metric, "seeds": seeds, "values": {n: [values[n][s] for s in seeds] for n in RUNS},
            "gap": vars(gap), "closed_by_state": vars(closed), "federation": vars(rest),
            "share_closed": vars(share)}


def table(split: dict) -> str:
    def line(label, test):
        return (f"| {label} | {fmt(test['mean'])} | [{fmt(test['low'])}, {fmt(test['high'])}] "
                f"| {fmt(test['p'])} |")

    share = split["share_closed"]
    lines = [f"{split['metric'].upper()} differences over seeds {split['seeds']} (paired; 95 % intervals):",
             "", "| difference | mean | 95 % interval | p |", "|---|---|---|---|",
             line("gap: fresh AdamW − centralized", split["gap"]),
             line("closed by keeping the client state: fresh − stateful", split["closed_by_state"]),
             line("left (the federation): stateful − centralized", split["federation"]),
             "", f"Share of the gap closed by keeping the state: {fmt(share['ratio'])} "
             + (f"[{fmt(share['low'])}, {fmt(share['high'])}] (Fieller, 95 %)" if share["bounded"]
                else "(interval unbounded: the gap itself is not clearly away from 0)")]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of the optimizer-reset study's report")
    parser.add_argument("--metric", default="fid")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        sys.exit(f"reset_gap: no results file '{path}' (run: python -m fedrun compare --grid "
                 "configs/grids/optimizer_reset.yaml --report <folder>)")
    split = split_gap(json.loads(path.read_text()), args.metric)
    print(table(split))
    if args.out:
        Path(args.out).write_text(json.dumps(split, indent=1) + "\n")


if __name__ == "__main__":
    main()
