"""Run every fedrun benchmark and write docs/benchmarks/{results.json,results.md,*.png}.

    python -m bench.run            # full: ~6-10 min on a 2-core CPU
    python -m bench.run --quick    # smoke run in well under a minute (CI); writes runs/bench-quick/

Process layout (start-up of a diffusers process is 7-16 s, so launches are few):
  python -m bench.local             1. local compute overhead, 3. memory vs virtual clients
  torchrun -np 2 -m bench.worker    2. aggregation, 4. federated vs DDP, 5. round breakdown
  torchrun -np 4 -m bench.worker    2. aggregation with 4 ranks (full run only)
On a CUDA machine everything runs on the GPUs (NCCL); multi-rank tasks need as many GPUs as ranks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common, configs


def _launch(cmd: list, log: Path, timeout: int) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=configs.REPO, env=common.bench_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - started


def _torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _rank_counts(quick: bool) -> list:
    import torch

    wanted = [2] if quick else [2, 4]
    if torch.cuda.is_available():
        return [n for n in wanted if n <= torch.cuda.device_count()]
    return wanted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-scale smoke run (tiny model)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: docs/benchmarks, or runs/bench-quick with --quick)")
    args = parser.parse_args(argv)
    out = Path(args.out or (configs.REPO / ("runs/bench-quick" if args.quick else "docs/benchmarks")))
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    timeout = 600 if args.quick else 1800
    started = time.perf_counter()
    results = {
        "command": "python -m bench.run" + (" --quick" if args.quick else "")
                   + (f" --out {args.out}" if args.out else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "machine": common.machine(), "load_start": common.loadavg(),
        "steps": {},
    }
    with tempfile.TemporaryDirectory(prefix="fedrun-bench-") as tmp:
        tmp = Path(tmp)
        step = "local"
        seconds = _launch([sys.executable, "-m", "bench.local", "--out", str(tmp / "local.json"), *quick],
                          tmp / "local.log", timeout)
        results["steps"][step] = {"wall_s": seconds, "load_after": common.loadavg()}
        results["local"] = _read(tmp / "local.json")
        results["workers"] = {}
        ranks = _rank_counts(args.quick)
        for nproc in ranks:
            tasks = "aggregation,fedcentral,breakdown" if nproc == ranks[0] else "aggregation"
            report = tmp / f"worker{nproc}.json"
            cmd = _torchrun(nproc) + ["-m", "bench.worker", "--out", str(report), "--workdir",
                                      str(tmp / f"work{nproc}"), "--tasks", tasks, *quick]
            seconds = _launch(cmd, tmp / f"worker{nproc}.log", timeout)
            results["steps"][f"worker{nproc}"] = {"wall_s": seconds, "load_after": common.loadavg()}
            results["workers"][str(nproc)] = _read(report)
        if not ranks:
            results["workers_skipped"] = "fewer than 2 GPUs: multi-rank benchmarks need one GPU per rank"
    results["total_wall_s"] = time.perf_counter() - started
    results["load_end"] = common.loadavg()
    common.write_json(out / "results.json", results)
    from bench import report

    report.write(out, results)
    print(f"bench: wrote {out}/results.json, results.md and plots in {results['total_wall_s']:.0f} s",
          file=sys.stderr)
    return 0


def _read(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
