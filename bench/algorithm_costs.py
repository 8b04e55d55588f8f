"""What the federated optimisation algorithms cost per round, side by side in one process.

    python -m bench.algorithm_costs [--repeats 12] [--set all|algorithms|codecs]
                                    [--out docs/benchmarks/algorithms]

The default job's shape (digits 16x16, the (32, 64) U-Net, C = 4 clients, E = 4, batch 16,
exact aggregation), one process, one thread. One federation per algorithm is built first; then
each repeat runs ONE round of every algorithm, in an order rotated every repeat (so drift and
warm-up hit all of them alike), and reports each round's time relative to FedAvg's round of the
same repeat: median of the per-repeat ratios [min-max]. The round's parts (local compute,
aggregation = the all-reduce and decode, server step) come from the round's own metrics record.
The first two repeats are warm-up and are dropped. The codecs (aggregation.uplink / downlink)
are measured the same way, and their encode + decode time alone on one update vector of the
job's size (median of 20).
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
CODECS = {
    "up bf16": ["aggregation.uplink=bf16"],
    "up qsgd 8 bit": ["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=8"],
    "up qsgd 4 bit": ["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=4"],
    "up qsgd 4 bit + EF": ["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=4",
                           "aggregation.uplink.error_feedback=true"],
    "up topk 10% + EF": ["aggregation.uplink.name=topk", "aggregation.uplink.fraction=0.1",
                         "aggregation.uplink.error_feedback=true"],
    "up randk 10%": ["aggregation.uplink.name=randk", "aggregation.uplink.fraction=0.1"],
    "down qsgd 8 bit": ["aggregation.downlink.name=qsgd", "aggregation.downlink.bits=8"],
}
# the same FedAvg federation twice: the harness's own spread (a configuration that differs in
# nothing from FedAvg, measured the same way)
CONTROL = {"fedavg (control)": []}
SETS = {"all": {**ALGORITHMS, **CODECS}, "algorithms": ALGORITHMS,
        "codecs": {"fedavg": [], **CONTROL, **CODECS}}
SHAPE = ["num_clients=4", "local_steps=4", "rounds=100000", "sample.every=0", "checkpoint.every=0",
         "eval.every=0", "logging.wandb=false", "logging.progress=false", "threads=1"]


def median_interval(values, resamples: int = 4000, seed: int = 0) -> list:
    """95 % percentile-bootstrap interval of the median of ``values``."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def codec_times(numel: int, repeats: int = 20) -> dict:
    """Encode + decode of one update of ``numel`` values per codec: median seconds."""
    import torch

    from fedrun.config import load_config
    from fedrun.engine.simulator import _Uplink
    from fedrun.fl.aggregation.codecs import build_channel

    out = {}
    update = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-3
    for name, extra in CODECS.items():
        way = "uplink" if name.startswith("up") else "downlink"
        channel = build_channel(getattr(load_config(None, extra).aggregation, way))
        times = []
        for rep in range(repeats):
            x = update.clone()
            started = time.perf_counter()
            _Uplink(channel, 0, rep, 0, None)(x)
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times)
    return out


def measure(repeats: int, root: Path, algorithms: dict) -> dict:
    from fedrun.engine import dist
    from fedrun.engine import simulator
    from fedrun.config import load_config
    from fedrun.engine.run import start_logging
    from fedrun.engine.metrics import code_commit

    commit = code_commit()
    with dist.session("cpu", 600, 1):
        feds, loggers = {}, {}
        for name, extra in algorithms.items():
            cfg = load_config("configs/digits_fedavg.yaml",
                              SHAPE + extra + [f"output_dir={root / name.replace(' ', '_')}"])
            feds[name] = simulator.setup(cfg)
            loggers[name] = start_logging(feds[name].run, "train", name)
        names = list(algorithms)
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
                                   "bytes_sent_per_client": record["bytes_sent_per_client"],
                                   "bytes_received_per_client": record["bytes_received_per_client"]})
    kept = {n: r[2:] for n, r in rows.items()}
    summary = {}
    for name in names:
        ratios = {key: [a[key] / b[key] for a, b in zip(kept[name], kept["fedavg"])]
                  for key in ("round_s", "local_compute_s", "aggregation_s", "server_s")}
        summary[name] = {
            **{f"{key}_ratio": [statistics.median(v), min(v), max(v)] for key, v in ratios.items()},
            "round_s_ratios": ratios["round_s"],  # every kept repeat
            "round_s_ratio_median_ci95": median_interval(ratios["round_s"]),
            **{f"{key}_median": statistics.median(r[key] for r in kept[name])
               for key in ("round_s", "local_compute_s", "aggregation_s", "server_s")},
            "buffer_bytes": kept[name][-1]["buffer_bytes"],
            "bytes_sent_per_client": kept[name][-1]["bytes_sent_per_client"],
            "bytes_received_per_client": kept[name][-1]["bytes_received_per_client"],
        }
    numel = feds["fedavg"].run.params.numel
    codecs = codec_times(numel) if any(n in CODECS for n in names) else {}
    return {"commit": commit, "repeats": repeats, "dropped_warmup": 2, "shape": SHAPE,
            "algorithms": algorithms, "summary": summary, "params": numel,
            "codec_encode_decode_s": codecs}


def to_markdown(result: dict) -> str:
    lines = [f"# Per-round cost of the algorithms (commit `{result['commit']}`)", "",
             "Default job shape (digits 16×16, (32, 64) U-Net, C = 4, E = 4, batch 16, exact "
             f"aggregation), one process, one thread; {result['repeats'] - 2} repeats of one round "
             "each, rotated order; ratio to FedAvg's round of the same repeat: median [min–max]. "
             "`python -m bench.algorithm_costs`.", "",
             "| algorithm | round / FedAvg | 95 % interval of that median | local compute / FedAvg | aggregation / FedAvg | "
             "server step / FedAvg | round s (median) | server step ms | all-reduce buffer | "
             "bytes sent per client | bytes received per client |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r: f"{r[0]:.2f} [{r[1]:.2f}–{r[2]:.2f}]"  # noqa: E731
    for name, s in result["summary"].items():
        ci = s.get("round_s_ratio_median_ci95")
        lines.append(f"| {name} | {fmt(s['round_s_ratio'])} | "
                     + (f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–")
                     + f" | {fmt(s['local_compute_s_ratio'])} | "
                     f"{fmt(s['aggregation_s_ratio'])} | {fmt(s['server_s_ratio'])} | "
                     f"{s['round_s_median']:.2f} | {1000 * s['server_s_median']:.1f} | "
                     f"{s['buffer_bytes'] / 1e6:.2f} MB | {s['bytes_sent_per_client'] / 1e6:.3f} MB | "
                     f"{s['bytes_received_per_client'] / 1e6:.3f} MB |")
    if result.get("codec_encode_decode_s"):
        fedavg_round = result["summary"]["fedavg"]["round_s_median"]
        lines += ["", f"Encode + decode of one update ({result['params']:,} values), median of 20, "
                  "and the round's share of it against FedAvg's median round (uplink: 4 clients' "
                  "messages; downlink: one per round, decoded alike by every client):", "",
                  "| codec | encode + decode ms | per round / FedAvg round |", "|---|---|---|"]
        for name, seconds in result["codec_encode_decode_s"].items():
            per_round = (4 if name.startswith("up") else 1) * seconds
            lines.append(f"| {name} | {1000 * seconds:.1f} | {per_round / fedavg_round:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--set", choices=sorted(SETS), default="all")
    parser.add_argument("--out", default="docs/benchmarks/algorithms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.repeats, Path(tmp), SETS[args.set])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "README.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
