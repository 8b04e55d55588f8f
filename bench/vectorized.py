"""Round throughput of vectorized clients (``client.vectorize``) against one client after another.

    python -m bench.vectorized [--clients 256] [--group-sizes 64] [--repeats 3] [--quick]
                               [--out docs/benchmarks/vectorized]

The regime where client-level DP can work: K = 256 single-image clients per round (the digits
split over num_clients = 1617, so each client holds one image; optim.batch_size = 1), E = 4
local steps, the default U-Net and optimizer (configs/digits_fedavg.yaml: AdamW, gradient
clipping 1.0), one process, one thread. Two federations of the same config are set up in this
process, one sequential (client.vectorize = 0) and one per group size G, and warmed up on two
clients each; each repeat then times one round of each (cohort, local training, the all-reduce,
the server step: ``simulator``'s steps 1-4) side by side, the order alternating between repeats.
Reported per G: the per-repeat ratio of round times sequential / vectorized, median [min-max],
by wall time and by the process's CPU time (on a shared machine the wall time also counts the
time other processes held the core), and clients per second. The federations train the same
cohorts, each from its own global weights; after the first repeat (round 1, from the same
weights) max |w_vectorized - w_sequential| is recorded beside the round's max |change|.
``--quick``: K = 16, one repeat (a check that it runs, not a measurement).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import common, configs


def _federation(work: Path, clients: int, steps: int, group_size: int):
    from fedrun.engine import simulator

    cfg = configs.load(work / f"g{group_size}", False, "num_clients=1617",
                       f"clients_per_round={clients}", f"local_steps={steps}",
                       "optim.batch_size=1", "rounds=1000", "sample.every=0",
                       "checkpoint.every=0", f"client.vectorize={group_size}")
    return simulator.setup(cfg)


def _round(fed, global_round: int) -> tuple:
    """(wall, CPU) seconds of one round's steps 1-4 (rank 0's logging and outputs excluded)."""
    from fedrun.engine import simulator

    started, cpu = time.perf_counter(), time.process_time()
    cohort, _dropped, mine = simulator.select_clients(fed, global_round)
    buffer = simulator.train_local(fed, cohort, mine, global_round)
    result = simulator.reduce_round(buffer, global_round)
    simulator.server_update(fed.seams, fed.run.global_weights, fed.run.ema, result, global_round,
                            fed.run.cfg.seed)
    return time.perf_counter() - started, time.process_time() - cpu


def _warm_up(fed) -> None:
    from fedrun.engine import simulator

    cohort, _dropped, mine = simulator.select_clients(fed, 0)
    simulator.train_local(fed, cohort, mine[:2], 0)


def measure(clients: int, steps: int, group_sizes, repeats: int, work: Path) -> dict:
    torch.set_num_threads(1)
    sequential = _federation(work, clients, steps, 0)
    vectorized = {g: _federation(work, clients, steps, g) for g in group_sizes}
    for fed in (sequential, *vectorized.values()):  # allocator, lazy initialisation, vmap set-up
        _warm_up(fed)
    initial = sequential.run.global_weights.clone()
    rows = []
    for rep in range(repeats):
        times, cpu = {}, {}
        order = [0, *group_sizes] if rep % 2 == 0 else [*group_sizes, 0]
        for g in order:
            times[g], cpu[g] = _round(sequential if g == 0 else vectorized[g], rep)
            print(f"repeat {rep + 1}: G={g or 'sequential'} {times[g]:.2f} s ({cpu[g]:.2f} s CPU)",
                  file=sys.stderr, flush=True)
        row = {"sequential_s": times[0], "sequential_cpu_s": cpu[0], "load": common.loadavg()}
        for g in group_sizes:
            row.update({f"g{g}_s": times[g], f"g{g}_cpu_s": cpu[g], f"g{g}_ratio": times[0] / times[g],
                        f"g{g}_cpu_ratio": cpu[0] / cpu[g]})
        if rep == 0:  # round 1 from the same global weights
            row["sequential_max_abs_change"] = float((sequential.run.global_weights - initial).abs().max())
            for g in group_sizes:
                row[f"g{g}_max_abs_diff"] = float((vectorized[g].run.global_weights
                                                   - sequential.run.global_weights).abs().max())
        rows.append(row)
    return {"rows": rows, **{f"g{g}": {
        "ratio_sequential_over_vectorized": common.summarize([r[f"g{g}_ratio"] for r in rows]),
        "cpu_ratio_sequential_over_vectorized": common.summarize([r[f"g{g}_cpu_ratio"] for r in rows]),
        "vectorized_clients_per_s": common.summarize([clients / r[f"g{g}_s"] for r in rows]),
        "sequential_clients_per_s": common.summarize([clients / r["sequential_s"] for r in rows]),
    } for g in group_sizes}, "model_params": sequential.run.params.numel}


def conv_floor(clients: int, repeats: int = 5) -> dict:
    """Why the speed-up has a ceiling on a CPU: one 3x3 convolution of the U-Net's lower block
    (64 -> 64 channels at 8x8), forward and backward, for ``clients`` clients of one image, timed
    (CPU ms per client, best of ``repeats``) three ways: as vmap runs it over stacked weights (a
    grouped convolution), client by client (the sequential path), and as one batch through ONE
    weight (what no per-client weights can reach)."""
    import torch.nn.functional as F
    from torch.func import grad, vmap

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(clients, 1, 64, 8, 8, generator=generator)
    weights = torch.randn(clients, 64, 64, 3, 3, generator=generator) * 0.05

    def loss(weight, image):
        return F.conv2d(image, weight, padding=1).square().sum()

    def vectorized():
        vmap(grad(loss))(weights, images)

    def one_by_one():
        for weight, image in zip(weights, images):
            weight = weight.clone().requires_grad_()
            loss(weight, image).backward()

    def shared():
        weight = weights[0].clone().requires_grad_()
        loss(weight, images[:, 0]).backward()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.process_time()
            fn()
            times.append(time.process_time() - started)
        return 1000 * min(times) / clients

    return {"clients": clients, "what": "CPU ms per client, 3x3 conv 64->64 at 8x8, forward+backward",
            "vmap_grouped_ms": best(vectorized), "one_by_one_ms": best(one_by_one),
            "shared_weight_batch_ms": best(shared)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=256, help="K, clients per round")
    parser.add_argument("--steps", type=int, default=4, help="E, local steps")
    parser.add_argument("--group-sizes", default="64", help="comma-separated G values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="K = 16, one repeat")
    parser.add_argument("--work", default="runs/bench_vectorized")
    parser.add_argument("--out", help="results folder (results.json)")
    args = parser.parse_args(argv)
    clients, repeats = (16, 1) if args.quick else (args.clients, args.repeats)
    group_sizes = [int(g) for g in args.group_sizes.split(",")]
    result = {"command": "python -m bench.vectorized " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": common.git_commit(), "machine": common.machine(), "load_before": common.loadavg(),
              "clients_per_round": clients, "local_steps": args.steps, "batch_size": 1,
              "threads": 1, **measure(clients, args.steps, group_sizes, repeats, Path(args.work)),
              "conv_floor": [conv_floor(g) for g in group_sizes],
              "load_after": common.loadavg()}
    if args.out:
        common.write_json(Path(args.out) / "results.json", result)
    for g in group_sizes:
        wall, cpu = (result[f"g{g}"][key] for key in ("ratio_sequential_over_vectorized",
                                                     "cpu_ratio_sequential_over_vectorized"))
        print(f"K={clients}, E={args.steps}, G={g}: round throughput vectorized / sequential: median "
              f"{wall['median']:.2f} [{wall['min']:.2f}-{wall['max']:.2f}] wall, {cpu['median']:.2f} "
              f"[{cpu['min']:.2f}-{cpu['max']:.2f}] CPU time, over {wall['n']} repeat(s)",
              file=sys.stderr)
    for row in result["conv_floor"]:
        print(f"one 3x3 conv 64->64 at 8x8, forward+backward, CPU ms per client (G={row['clients']}): "
              f"vmap {row['vmap_grouped_ms']:.3f}, one by one {row['one_by_one_ms']:.3f}, shared-weight "
              f"batch {row['shared_weight_batch_ms']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
