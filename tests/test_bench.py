"""The benchmark suite runs end to end in its --quick form (no timing assertions: benchmarks are
not timed tests). One `python -m bench.run --quick` = one single-process step + one 2-rank torchrun."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_quick_runs_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                         "OMP_WAIT_POLICY": "PASSIVE"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] and results["machine"]["torch"]
    assert results["local"]["local_compute"]["ratio"]["n"] >= 1
    assert [r["num_clients"] for r in results["local"]["memory"]["rows"]] == [4, 16, 64, 256]
    worker = results["workers"]["2"]
    assert {"bare_flat", "fedrun_full", "fedrun_reduce", "per_tensor"} <= set(
        next(iter(worker["aggregation"]["states"].values()))["seconds"])
    assert [r["local_steps"] for r in worker["fedcentral"]["rows"]] == [1, 4]
    for row in worker["fedcentral"]["rows"]:  # equal samples processed, by construction
        assert row["fedrun_samples_check"] == row["samples"]
    assert worker["breakdown"]["rounds"] == 3
    assert abs(sum(worker["breakdown"]["shares"].values()) - 1.0) < 1e-6
    text = (tmp_path / "results.md").read_text()
    for heading in ("1. Local compute", "2. Aggregation", "3. Memory", "4. Federated", "5. Round time"):
        assert heading in text
    for png in ("aggregation.png", "breakdown.png", "memory_and_local.png"):
        assert (tmp_path / png).stat().st_size > 0
