"""Run every fedrun benchmark and write docs/benchmarks/{results.json,results.md,*.png}.

    python -m bench.run            # full: ~6-10 min on a 2-core CPU
    python -m bench.run --quick    # smoke run in well under a minute (CI); writes runs/bench-quick/

Process layout (start-up of a diffusers process is 7-16 s, so launches are few):
  python -m bench.local             1. local compute overhead, 3. memory vs virtual clients,
                                    7. client state store, 6. exact-sum accuracy
  torchrun -np 2 -m bench.worker    2. aggregation, 6. exact vs fp32 round, 4. federated vs DDP,
                                    5. round breakdown
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


def _start(cmd: list, log: Path) -> tuple:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=configs.REPO, env=common.bench_env(), stdout=out,
                            stderr=subprocess.STDOUT)
    return proc, out, cmd, log, time.perf_counter()


def _finish(started: tuple, timeout: int) -> float:
    proc, out, cmd, log, t0 = started
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    out.close()
    if code != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"benchmark step failed ({code}): {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def _launch(cmd: list, log: Path, timeout: int) -> float:
    return _finish(_start(cmd, log), timeout)


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
        "quick": args.quick, "commit": common.git_commit(), "machine": common.machine(),
        "load_start": common.loadavg(),
        "steps": {},
    }
    with tempfile.TemporaryDirectory(prefix="fedrun-bench-") as tmp:
        tmp = Path(tmp)
        local_cmd = [sys.executable, "-m", "bench.local", "--out", str(tmp / "local.json"), *quick]
        ranks = _rank_counts(args.quick)
        commands = {}
        for nproc in ranks:
            tasks = "aggregation,exact_round,fedcentral,breakdown" if nproc == ranks[0] else "aggregation"
            commands[nproc] = _torchrun(nproc) + [
                "-m", "bench.worker", "--out", str(tmp / f"worker{nproc}.json"), "--workdir",
                str(tmp / f"work{nproc}"), "--tasks", tasks, *quick]
        if args.quick:
            # Timings do not matter in a smoke run, start-up does: run the steps concurrently.
            running = {"local": _start(local_cmd, tmp / "local.log")}
            running.update({f"worker{n}": _start(c, tmp / f"worker{n}.log") for n, c in commands.items()})
            try:
                for step, started_step in running.items():
                    results["steps"][step] = {"wall_s": _finish(started_step, timeout),
                                              "load_after": common.loadavg()}
            finally:  # a failed step must not leave the other one running
                for proc, *_ in running.values():
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        else:  # one step at a time: benchmarks must not compete with each other for the cores
            results["steps"]["local"] = {"wall_s": _launch(local_cmd, tmp / "local.log", timeout),
                                         "load_after": common.loadavg()}
            for nproc, cmd in commands.items():
                results["steps"][f"worker{nproc}"] = {
                    "wall_s": _launch(cmd, tmp / f"worker{nproc}.log", timeout),
                    "load_after": common.loadavg()}
        results["local"] = _read(tmp / "local.json")
        results["workers"] = {str(n): _read(tmp / f"worker{n}.json") for n in commands}
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
