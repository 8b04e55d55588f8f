"""What the federated optimisation algorithms cost per round, side by side in one process.

    python -m bench.algorithm_costs [--repeats 12] [--out docs/benchmarks/algorithms]

The default job's shape (digits 16x16, the (32, 64) U-Net, C = 4 clients, E = 4, batch 16,
exact aggregation), one process, one thread. One federation per algorithm is built first; then
each repeat runs ONE round of every algorithm, in an order rotated every repeat (so drift and
warm-up hit all of them alike), and reports each round's time relative to FedAvg's round of the
same repeat: median of the per-repeat ratios [min-max]. The round's parts (local compute,
aggregation = the all-reduce and decode, server step) come from the round's own metrics record.
The first two repeats are warm-up and are dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ALGORITHMS = {
    "fedavg": [],
    "fedavgm": ["server.strategy=fedavgm"],
    "fedadam": ["server.strategy=fedadam"],
    "fedyogi": ["server.strategy=fedyogi"],
    "fedprox": ["client.algorithm=fedprox"],
    "scaffold (sgd)": ["client.algorithm=scaffold", "optim.name=sgd", "optim.lr=0.05",
                       "optim.momentum=0", "optim.grad_clip=null"],
    "fedavg sgd": ["optim.name=sgd", "optim.lr=0.05"],
    "stateful adamw": ["client.stateful_optimizer=true"],
}
SHAPE = ["num_clients=4", "local_steps=4", "rounds=100000", "sample.every=0", "checkpoint.every=0",
         "eval.every=0", "logging.wandb=false", "logging.progress=false", "threads=1"]


def measure(repeats: int, root: Path) -> dict:
    from fedrun.engine import dist
    from fedrun.engine import simulator
    from fedrun.config import load_config
    from fedrun.engine.run import start_logging
    from fedrun.engine.metrics import code_commit

    commit = code_commit()
    with dist.session("cpu", 600, 1):
        feds, loggers = {}, {}
        for name, extra in ALGORITHMS.items():
            cfg = load_config("configs/digits_fedavg.yaml",
                              SHAPE + extra + [f"output_dir={root / name.replace(' ', '_')}"])
            feds[name] = simulator.setup(cfg)
            loggers[name] = start_logging(feds[name].run, "train", name)
        names = list(ALGORITHMS)
        rows = {n: [] for n in names}
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                started = time.perf_counter()
                record = simulator.run_round(feds[name], rep, loggers[name])
                rows[name].append({"round_s": time.perf_counter() - started,
                                   "local_compute_s": record["local_compute_s"],
                                   "aggregation_s": record["aggregation_s"],
                                   "server_s": record["server_s"],
                                   "buffer_bytes": record["buffer_bytes"],
                                   "bytes_sent_per_client": record["bytes_sent_per_client"]})
    kept = {n: r[2:] for n, r in rows.items()}
    summary = {}
    for name in names:
        ratios = {key: [a[key] / b[key] for a, b in zip(kept[name], kept["fedavg"])]
                  for key in ("round_s", "local_compute_s", "aggregation_s", "server_s")}
        summary[name] = {
            **{f"{key}_ratio": [statistics.median(v), min(v), max(v)] for key, v in ratios.items()},
            **{f"{key}_median": statistics.median(r[key] for r in kept[name])
               for key in ("round_s", "local_compute_s", "aggregation_s", "server_s")},
            "buffer_bytes": kept[name][-1]["buffer_bytes"],
            "bytes_sent_per_client": kept[name][-1]["bytes_sent_per_client"],
        }
    return {"commit": commit, "repeats": repeats, "dropped_warmup": 2, "shape": SHAPE,
            "algorithms": ALGORITHMS, "summary": summary}


def to_markdown(result: dict) -> str:
    lines = [f"# Per-round cost of the algorithms (commit `{result['commit']}`)", "",
             "Default job shape (digits 16×16, (32, 64) U-Net, C = 4, E = 4, batch 16, exact "
             f"aggregation), one process, one thread; {result['repeats'] - 2} repeats of one round "
             "each, rotated order; ratio to FedAvg's round of the same repeat: median [min–max]. "
             "`python -m bench.algorithm_costs`.", "",
             "| algorithm | round / FedAvg | local compute / FedAvg | aggregation / FedAvg | "
             "server step / FedAvg | round s (median) | server step ms | all-reduce buffer | "
             "bytes sent per client |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r: f"{r[0]:.2f} [{r[1]:.2f}–{r[2]:.2f}]"  # noqa: E731
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {fmt(s['round_s_ratio'])} | {fmt(s['local_compute_s_ratio'])} | "
                     f"{fmt(s['aggregation_s_ratio'])} | {fmt(s['server_s_ratio'])} | "
                     f"{s['round_s_median']:.2f} | {1000 * s['server_s_median']:.1f} | "
                     f"{s['buffer_bytes'] / 1e6:.2f} MB | {s['bytes_sent_per_client'] / 1e6:.2f} MB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", default="docs/benchmarks/algorithms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.repeats, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "README.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
