"""Single-process benchmarks.

1. Local compute overhead: samples/s of fedrun's local training -- ``simulator.train_local``, the
   function the round loop calls (``params.load_`` of the global weights, a fresh AdamW and
   ``client.train_client`` per client, ``RoundBuffer.add_client``) -- against a bare PyTorch loop
   over the same diffusers U-Net, batch size, AdamW settings, gradient clipping and threads.
   Repeats alternate which of the two runs first (ABBA), so drift in the machine's load hits both.
3. Memory vs virtual clients: a child process per C (forked from this process after the imports,
   before any compute) runs ``simulator.run`` with C clients, K clients per round, and reports its
   peak resident set (``ru_maxrss``).

    python -m bench.local --out result.json [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import common, configs


# ---------------------------------------------------------------- 1. local compute

class BareLoop:
    """The textbook single-process DDPM loop fedrun's local training is compared with."""

    def __init__(self, cfg, dataset, device: torch.device):
        from fedrun.models import build_noise_scheduler, build_unet

        self.cfg, self.device = cfg, device
        self.unet = build_unet(cfg.model, dataset.image_size, dataset.num_channels, cfg.seed).to(device)
        self.scheduler = build_noise_scheduler(cfg.diffusion)
        self.images = dataset.get_batch(np.arange(len(dataset))).to(device)
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.unet.train()

    def steps(self, n: int) -> float:
        optim, timesteps = self.cfg.optim, self.scheduler.config.num_train_timesteps
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(n):
            x = self.images[torch.randint(0, len(self.images), (optim.batch_size,), device=self.device)]
            noise = torch.randn_like(x)
            t = torch.randint(0, timesteps, (optim.batch_size,), device=self.device)
            loss = F.mse_loss(self.unet(self.scheduler.add_noise(x, noise, t), t).sample, noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), optim.grad_clip)
            self.optimizer.step()
            loss_sum += loss.detach()
        return float(loss_sum) / n


def local_compute(quick: bool, workdir: Path) -> dict:
    from fedrun import simulator

    cfg = configs.load(workdir / "local", quick, "rounds=1000000")
    fed = simulator.setup(cfg)
    bare = BareLoop(cfg, fed.dataset, fed.device)
    batch = cfg.optim.batch_size

    clients_per_repeat = 2  # short repeats: the two sides of a pair see the same machine load

    def my_clients(r: int) -> tuple:
        cohort, _dropped, mine = simulator.select_clients(fed, r)
        mine = mine[:clients_per_repeat]
        return cohort, mine, sum(simulator.client_steps(fed, c) for c in mine)

    def fedrun_round(r: int) -> float:
        cohort, mine, _ = my_clients(r)
        return common.timed(lambda: simulator.train_local(fed, cohort, mine, r), fed.device)

    # Warm-up: allocator, first AdamW state, lazy diffusers/torch initialisation.
    fedrun_round(0)
    bare.steps(my_clients(0)[2])
    repeats = 2 if quick else 16
    rows = []
    for rep in range(repeats):
        r = rep + 1
        steps = my_clients(r)[2]
        if rep % 2 == 0:
            t_fed = fedrun_round(r)
            t_bare = common.timed(lambda: bare.steps(steps), fed.device)
        else:
            t_bare = common.timed(lambda: bare.steps(steps), fed.device)
            t_fed = fedrun_round(r)
        samples = steps * batch
        rows.append({"samples": samples, "fedrun_s": t_fed, "bare_s": t_bare,
                     "fedrun_samples_per_s": samples / t_fed, "bare_samples_per_s": samples / t_bare,
                     "ratio": (samples / t_fed) / (samples / t_bare), "load": common.loadavg()})
    return {
        "what": "samples/s of simulator.train_local (2 of the round's clients per repeat) vs a bare loop",
        "device": str(fed.device), "threads": torch.get_num_threads(),
        "model_params": fed.params.numel, "batch_size": batch,
        "clients_per_repeat": clients_per_repeat,
        "steps_per_repeat": rows[0]["samples"] // batch,
        "repeats": rows,
        "fedrun_samples_per_s": common.summarize([r["fedrun_samples_per_s"] for r in rows]),
        "bare_samples_per_s": common.summarize([r["bare_samples_per_s"] for r in rows]),
        "ratio": common.summarize([r["ratio"] for r in rows]),
        "best_of_n_ratio": max(r["fedrun_samples_per_s"] for r in rows) / max(r["bare_samples_per_s"] for r in rows),
        "goal": ">= 0.97",
    }


# ---------------------------------------------------------------- 3. memory vs clients

def _memory_child(num_clients: int, clients_per_round: int, rounds: int, workdir: str, conn) -> None:
    try:
        from fedrun import simulator

        start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # quick=True: the tests' tiny U-Net; it is the data structures per client that must stay flat.
        cfg = configs.load(Path(workdir) / f"mem_c{num_clients}", True, f"num_clients={num_clients}",
                           f"clients_per_round={clients_per_round}", f"rounds={rounds}",
                           "local_steps=2", "sample.every=0", "checkpoint.every=0")
        started = time.perf_counter()
        simulator.run(cfg)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send({"num_clients": num_clients, "peak_rss_mib": peak_kib / 1024,
                   "rss_at_fork_mib": start_kib / 1024, "growth_mib": (peak_kib - start_kib) / 1024,
                   "seconds": time.perf_counter() - started})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"num_clients": num_clients, "error": repr(exc)})
    finally:
        conn.close()


def memory_vs_clients(quick: bool, workdir: Path) -> dict:
    counts = (4, 16, 64, 256)
    clients_per_round, rounds = 4, (1 if quick else 5)
    # Import everything a run touches before forking, so "growth" is the run's own state
    # (model, optimizer, data, buffers) and not lazily imported modules.
    import diffusers  # noqa: F401
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: F401

    import fedrun.checkpoint  # noqa: F401
    import fedrun.evaluate  # noqa: F401
    import fedrun.simulator  # noqa: F401
    from fedrun.data import datasets  # noqa: F401

    context = multiprocessing.get_context("fork")
    rows = []
    for num_clients in counts:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_memory_child,
                                args=(num_clients, clients_per_round, rounds, str(workdir), send))
        child.start()
        send.close()
        rows.append(receive.recv())
        child.join()
        if "error" in rows[-1]:
            raise RuntimeError(f"memory child C={num_clients} failed: {rows[-1]['error']}")
    peaks = [r["peak_rss_mib"] for r in rows]
    return {
        "what": "peak RSS of one rank (world size 1: it trains every sampled client) vs C",
        "config": "tests' tiny 8x8 U-Net on all training digits, K=4, E=2, "
                  f"{rounds} rounds, final sample grid + checkpoint + export",
        "clients_per_round": clients_per_round, "rounds": rounds, "rows": rows,
        "spread_pct": 100.0 * (max(peaks) - min(peaks)) / min(peaks),
        "goal": "flat within 5 %",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("local_compute", "memory"), default=None)
    args = parser.parse_args()
    result = {"load_before": common.loadavg()}
    with tempfile.TemporaryDirectory(prefix="fedrun-bench-") as tmp:
        # Memory first: the children are forked before this process has run any torch compute.
        if args.only in (None, "memory"):
            result["memory"] = memory_vs_clients(args.quick, Path(tmp))
        if args.only in (None, "local_compute"):
            result["local_compute"] = local_compute(args.quick, Path(tmp))
    result["load_after"] = common.loadavg()
    common.write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
