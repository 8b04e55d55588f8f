"""Noise multiplicity (``diffusion.noise_draws``) and the clipped update of a single-image client.

Under client-level DP each client's update is clipped before the noisy sum, so what survives is
its direction. With one image per client, most of that direction is the diffusion noise and
timesteps the client happened to draw, not the image. Averaging several draws per image in the
loss (DPDM, Dockhorn et al. 2023) should make the direction more the image's and less the
draw's. This script measures it on the default digits U-Net (``configs/digits_fedavg.yaml``:
16x16, (32, 64), AdamW lr 2e-3, E = 4 local steps):

- K single-image clients (K distinct training images), each trained twice from the same global
  weights with independent draws (generators (seed, client, 0) and (seed, client, 1));
- every update w_c - w clipped to L2 norm ``--clip`` (what 'dp_clip' does);
- for noise_draws in {1, 2, 4, 8}, at the initial weights and after ``--train-steps`` centralized
  AdamW steps (batch 16) on the training images:
  * ``self_cosine``: cosine between the two clipped updates of the same client (1 = the draws
    do not matter, 0 = the update is all draw);
  * ``cross_cosine``: mean cosine between different clients' clipped updates;
  * ``mean_norm`` / ``alignment``: norm of the mean of the K clipped updates, and that divided
    by the mean norm of the clipped updates (1 = all point the same way);
  * ``signal``: sqrt(<m_0, m_1>), m_r the mean of the K clipped updates of repeat r: an unbiased
    estimate of the norm of the mean the draws average to, which is what the DP noise
    (sigma * clip / K per coordinate) has to be compared with;
  * ``step_s``: seconds per local step (median over clients and repeats; the draws are
    interleaved per client, so machine load hits every setting alike) and its ratio to 1 draw.

Clients train with batch size ``--batch-size`` (default 1). A one-image client with batch B > 1
already sees B draws of its image per step (``batch_indices`` wraps around its single image):
noise_draws = D with batch B is the same loss as batch B x D.

    python -m bench.noise_draws [--quick] [--clients 16] [--overrides KEY=VALUE ...] [--out FILE]

Full: about 2 minutes on a loaded 2-core CPU (one thread); ``--quick``: the tests' 8x8 U-Net,
K = 4, a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from bench import common, configs

DRAWS = (1, 2, 4, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few clients (smoke run)")
    parser.add_argument("--clients", type=int, default=None, help="K single-image clients (16; quick 4)")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip norm of a client's update")
    parser.add_argument("--batch-size", type=int, default=1, help="a client's batch (its image repeated)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="centralized AdamW steps (batch 16) before the second measurement (300; quick 10)")
    parser.add_argument("--draws", type=int, nargs="+", default=list(DRAWS))
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="config overrides, e.g. optim.name=sgd optim.momentum=0 optim.lr=0.2")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


class Bench:
    """The digits task, its model as a flat vector, and K single-image clients."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        from fedrun.engine.flat import FlatParameters
        from fedrun.tasks.base import build_task

        torch.set_num_threads(1)
        self.args = args
        self.cfg = configs.load(workdir, args.quick, *args.overrides)
        self.base_optim = configs.load(workdir, args.quick).optim  # the pre-training's, always AdamW
        self.task = build_task(self.cfg)
        built = self.task.build(torch.device("cpu"))
        self.dataset, self.model = built.dataset, built.model
        self.params = FlatParameters(self.model)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed))
        self.images = order[: args.clients].numpy()  # client c holds training image images[c]

    def set_draws(self, draws: int) -> None:
        self.task.cfg.diffusion = dataclasses.replace(self.task.cfg.diffusion, noise_draws=draws)

    def pretrain(self, steps: int) -> torch.Tensor:
        """Global weights after ``steps`` centralized steps of batch 16 (one draw per image) with
        the digits config's optimizer (AdamW lr 2e-3, whatever ``--overrides`` give the clients)."""
        from fedrun.fl.local import train_client
        from fedrun.rng import derived_generator

        self.set_draws(1)
        generator = derived_generator(self.cfg.seed, 999_999)
        batches = torch.randint(0, len(self.dataset), (steps, 16), generator=generator).numpy()
        if steps:
            train_client(self.model, self.params.params, self.task.loss, batches, generator,
                         self.base_optim, torch.device("cpu"))
        return self.params.flat.detach().clone()

    def client_update(self, weights: torch.Tensor, client: int, repeat: int, draws: int):
        """(w_c - w, seconds per local step) of client ``client``'s E steps from ``weights``."""
        from fedrun.fl.local import client_generator, train_client

        self.set_draws(draws)
        self.params.load_(weights)
        batches = np.full((self.cfg.local_steps, self.args.batch_size), self.images[client])
        started = time.perf_counter()
        train_client(self.model, self.params.params, self.task.loss, batches,
                     client_generator(self.cfg.seed, client, repeat), self.cfg.optim,
                     torch.device("cpu"))
        seconds = (time.perf_counter() - started) / self.cfg.local_steps
        return self.params.flat.detach() - weights, seconds


def clipped(delta: torch.Tensor, norm: float) -> torch.Tensor:
    return delta * min(1.0, norm / max(float(delta.norm()), 1e-12))


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, K) cosines between the rows of ``a`` and of ``b``."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a.double() @ b.double().T


def signal_stats(raw: List[torch.Tensor], clip: float) -> Dict[str, float]:
    """The statistics of the module docstring for the two repeats' updates ``raw`` ((K, P) each)."""
    k = raw[0].shape[0]
    updates = [torch.stack([clipped(d, clip) for d in r]) for r in raw]
    means = [u.mean(dim=0).double() for u in updates]
    same = _cosines(updates[0], updates[1]).diagonal()
    cross = _cosines(updates[0], updates[0])
    off_diagonal = cross[~torch.eye(k, dtype=torch.bool)]
    mean_norm = float(means[0].norm())
    return {"raw_norm_median": float(raw[0].norm(dim=1).double().quantile(0.5)),
            "clipped_fraction": float((raw[0].norm(dim=1) > clip).double().mean()),
            "self_cosine": float(same.mean()), "cross_cosine": float(off_diagonal.mean()),
            "mean_norm": mean_norm,
            "alignment": mean_norm / float(updates[0].norm(dim=1).mean()),
            "signal": float(max(0.0, float(means[0] @ means[1])) ** 0.5)}


def measure(bench: Bench, weights: torch.Tensor, draws: List[int]) -> Dict[int, dict]:
    """One row per draw count at ``weights``; draw counts interleaved per client."""
    raw = {d: [[], []] for d in draws}
    seconds = {d: [] for d in draws}
    for client in range(bench.args.clients):
        for repeat in (0, 1):
            for d in draws:
                delta, step_s = bench.client_update(weights, client, repeat, d)
                raw[d][repeat].append(delta.clone())
                seconds[d].append(step_s)
    rows = {}
    for d in draws:
        rows[d] = {"noise_draws": d, **signal_stats([torch.stack(r) for r in raw[d]], bench.args.clip),
                   "step_s": statistics.median(seconds[d])}
    base = rows[draws[0]]
    for row in rows.values():
        row["signal_vs_first"] = row["signal"] / base["signal"] if base["signal"] > 0 else None
        row["step_s_vs_first"] = row["step_s"] / base["step_s"]
    return rows


def render(result: dict) -> str:
    lines = ["| weights | noise_draws | raw norm (median) | clipped | self-cosine | cross-cosine | "
             "‖mean‖ | alignment | signal | signal / 1 draw | s / step | time / 1 draw |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for state in result["states"]:
        for r in state["rows"]:
            lines.append(
                f"| {state['name']} | {r['noise_draws']} | {r['raw_norm_median']:.3g} | "
                f"{r['clipped_fraction']:.0%} | {r['self_cosine']:.3f} | {r['cross_cosine']:.3f} | "
                f"{r['mean_norm']:.3f} | {r['alignment']:.3f} | {r['signal']:.3f} | "
                f"{r['signal_vs_first']:.2f} | {r['step_s']:.3f} | {r['step_s_vs_first']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import tempfile

    args = parse_args(argv)
    args.clients = args.clients or (4 if args.quick else 16)
    train_steps = args.train_steps if args.train_steps is not None else (10 if args.quick else 300)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(args, Path(work) / "run")
        initial = bench.params.flat.detach().clone()
        states = [("initial", initial)]
        if train_steps:
            states.append((f"after {train_steps} steps", bench.pretrain(train_steps)))
        result = {"commit": common.git_commit(), "machine": common.machine(),
                  "loadavg_start": common.loadavg(), "clients": args.clients, "clip": args.clip,
                  "batch_size": args.batch_size, "local_steps": bench.cfg.local_steps,
                  "overrides": args.overrides, "optimizer": dataclasses.asdict(bench.cfg.optim),
                  "parameters": bench.params.numel, "quick": args.quick, "states": []}
        for name, weights in states:
            rows = measure(bench, weights, args.draws)
            result["states"].append({"name": name, "rows": [rows[d] for d in args.draws]})
    result["loadavg_end"] = common.loadavg()
    result["seconds"] = time.perf_counter() - started
    print(render(result))
    print(f"{result['seconds']:.0f} s, commit {result['commit']}, load {result['loadavg_start']} -> "
          f"{result['loadavg_end']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
