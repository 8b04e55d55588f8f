"""The cost of one thread per CPU rank (the default since issue 17) for a single-process run.

    python -m bench.threads [--pairs 4] [--rounds 20] [--out docs/benchmarks/threads]

A single process of the default job (configs/digits_fedavg.yaml) with threads=1 and with
threads=2 (what a lone process took before: its share of a 2-core machine), run in turn, pair
after pair; per run the median round time from its metrics.jsonl (start-up excluded); reported:
the per-pair ratio threads=1 / threads=2, median [min-max]. With several ranks nothing changes:
each rank already had one thread on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench import common, configs


def _median_round(threads: int, rounds: int, out: Path) -> float:
    run_dir = out / f"threads{threads}"
    args = configs.overrides(run_dir, False, f"rounds={rounds}", f"threads={threads}",
                             "sample.every=0", "checkpoint.every=0")
    subprocess.run([sys.executable, "-m", "fedrun", "train", "--config", configs.DIGITS, *args],
                   cwd=configs.REPO, env=common.bench_env(), check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["round_time_s"] for r in records[1:])  # round 1 warms up


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--work", default="runs/bench_threads")
    parser.add_argument("--out", help="results folder (results.json)")
    args = parser.parse_args(argv)
    rows = []
    for pair in range(args.pairs):
        order = (1, 2) if pair % 2 == 0 else (2, 1)
        times = {t: _median_round(t, args.rounds, Path(args.work)) for t in order}
        rows.append({"threads1_s": times[1], "threads2_s": times[2], "ratio": times[1] / times[2]})
        print(f"pair {pair + 1}: 1 thread {times[1]:.3f} s, 2 threads {times[2]:.3f} s a round",
              file=sys.stderr, flush=True)
    result = {"command": "python -m bench.threads " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": common.git_commit(), "machine": common.machine(), "load": common.loadavg(),
              "rows": rows, "ratio_threads1_over_threads2": common.summarize([r["ratio"] for r in rows])}
    if args.out:
        common.write_json(Path(args.out) / "results.json", result)
    stats = result["ratio_threads1_over_threads2"]
    print(f"round time, 1 thread / 2 threads: median {stats['median']:.3f} "
          f"[{stats['min']:.3f}-{stats['max']:.3f}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
