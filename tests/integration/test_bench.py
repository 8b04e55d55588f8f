"""The benchmark suite runs end to end in its --quick form (no timing assertions: benchmarks are
not timed tests). One `python -m bench.run --quick` = one single-process step + one 2-rank torchrun."""

import pytest
import json
import os
import subprocess
import sys

from conftest import REPO


pytestmark = pytest.mark.slow  # benchmarks: launches torchrun jobs and times them


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
    state = next(iter(worker["aggregation"]["states"].values()))
    assert {"bare_flat", "fedrun_full", "fedrun_reduce", "per_tensor", "bare_fedavg",
            "fedrun_full_exact", "fedrun_reduce_exact"} <= set(state["seconds"])
    assert {"exact_vs_fp32_full", "exact_vs_fp32_reduce"} <= set(state["ratios"])
    assert state["exact_buffer_bytes"] > state["buffer_bytes"] > 0  # float64 vs fp32
    exact_round = worker["exact_round"]
    assert exact_round["ratio"]["n"] >= 1 and set(exact_round["round_s"]) == {"exact", "fp32"}
    assert exact_round["buffer_bytes"]["exact"] > exact_round["buffer_bytes"]["fp32"]
    accuracy = results["local"]["exact_accuracy"]
    assert accuracy["exact"]["bit_identical_across_groupings"] is True  # the point of exact mode
    assert all(e["relative_l2"] < 1e-6 for mode in ("exact", "fp32")
               for e in accuracy[mode]["errors"].values())
    store = results["local"]["state_store"]
    assert [r["num_clients"] for r in store["rows"]] == [4, 16, 64, 256]
    for row in store["rows"]:  # every client trained so far left exactly one state on disk
        assert row["clients_with_state"] >= 1 and row["save_calls"] >= row["clients_with_state"]
        assert row["state_disk_bytes"] >= row["clients_with_state"] * row["state_bytes_each"]
    assert [r["local_steps"] for r in worker["fedcentral"]["rows"]] == [1, 4]
    for row in worker["fedcentral"]["rows"]:  # equal samples processed, by construction
        assert row["fedrun_samples_check"] == row["samples"]
    assert worker["breakdown"]["rounds"] == 3
    assert abs(sum(worker["breakdown"]["shares"].values()) - 1.0) < 1e-6
    text = (tmp_path / "results.md").read_text()
    for heading in ("1. Local compute", "2. Aggregation", "3. Memory", "4. Federated", "5. Round time",
                    "6. Exact vs fp32", "7. Client state store"):
        assert heading in text
    for png in ("aggregation.png", "breakdown.png", "memory_and_local.png"):
        assert (tmp_path / png).stat().st_size > 0
