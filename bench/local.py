"""Single-process benchmarks.

1. Local compute overhead: samples/s of fedrun's local training -- ``simulator.train_local``, the
   function the round loop calls (``params.load_`` of the global weights, a fresh AdamW and
   ``client.train_client`` per client, ``RoundBuffer.add_client``) -- against a bare PyTorch loop
   over the same diffusers U-Net, batch size, AdamW settings, gradient clipping and threads.
   Repeats alternate which of the two runs first (ABBA), so drift in the machine's load hits both.
3. Memory vs virtual clients: a child process per C (forked from this process after the imports,
   before any compute) runs ``simulator.run`` with C clients, K clients per round, and reports its
   peak resident set (``ru_maxrss``).
6. Exact sums: relative error of the decoded round sum vs a float64 reference (exact vs fp32) and
   bit-identity of the decoded sum across groupings of the clients into ranks.
7. Client state store: the memory runs again with a stateful client algorithm
   (``bench.algorithms``): peak RSS, bytes of ``client_state/`` on disk, load + save time.

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

from bench import algorithms, common, configs  # noqa: F401  (algorithms: registers bench_stateful)


# ---------------------------------------------------------------- 1. local compute

class BareLoop:
    """The textbook single-process DDPM loop fedrun's local training is compared with."""

    def __init__(self, cfg, dataset, device: torch.device):
        from fedrun.tasks.diffusion import build_noise_scheduler
        from fedrun.tasks.ddpm.model import build_unet

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
    from fedrun.engine import simulator

    cfg = configs.load(workdir / "local", quick, "rounds=1000000")
    fed = simulator.setup(cfg)
    bare = BareLoop(cfg, fed.run.dataset, fed.run.device)
    batch = cfg.optim.batch_size

    clients_per_repeat = 2  # short repeats: the two sides of a pair see the same machine load

    def my_clients(r: int) -> tuple:
        cohort, _dropped, mine = simulator.select_clients(fed, r)
        mine = mine[:clients_per_repeat]
        return cohort, mine, sum(simulator.client_steps(fed.run, c) for c in mine)

    def fedrun_round(r: int) -> float:
        cohort, mine, _ = my_clients(r)
        return common.timed(lambda: simulator.train_local(fed, cohort, mine, r), fed.run.device)

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
            t_bare = common.timed(lambda: bare.steps(steps), fed.run.device)
        else:
            t_bare = common.timed(lambda: bare.steps(steps), fed.run.device)
            t_fed = fedrun_round(r)
        samples = steps * batch
        rows.append({"samples": samples, "fedrun_s": t_fed, "bare_s": t_bare,
                     "fedrun_samples_per_s": samples / t_fed, "bare_samples_per_s": samples / t_bare,
                     "ratio": (samples / t_fed) / (samples / t_bare), "load": common.loadavg()})
    return {
        "what": "samples/s of simulator.train_local (2 of the round's clients per repeat) vs a bare loop",
        "device": str(fed.run.device), "threads": torch.get_num_threads(),
        "model_params": fed.run.params.numel, "batch_size": batch,
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

COUNTS = (4, 16, 64, 256)
CLIENTS_PER_ROUND = 4


def _memory_rounds(quick: bool) -> int:
    return 1 if quick else 16


def _time_store_calls(spent: dict) -> None:
    """Wrap ClientStateStore.load/save to add up their time (in a forked child only)."""
    from fedrun.engine.client_state import ClientStateStore

    def wrap(name: str):
        original = getattr(ClientStateStore, name)

        def timed_call(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent[name + "_s"] += time.perf_counter() - started
                spent[name + "_calls"] += 1
        setattr(ClientStateStore, name, timed_call)

    wrap("load")
    wrap("save")


def _memory_child(num_clients: int, algorithm: str, rounds: int, workdir: str, conn) -> None:
    try:
        from fedrun.engine import simulator
        from fedrun.engine.client_state import ClientStateStore
        from fedrun.engine.metrics import read_metrics

        spent = {"load_s": 0.0, "load_calls": 0, "save_s": 0.0, "save_calls": 0}
        _time_store_calls(spent)
        start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # quick=True: the tests' tiny U-Net; it is the data structures per client that must stay flat.
        run_dir = Path(workdir) / f"mem_{algorithm}_c{num_clients}"
        cfg = configs.load(run_dir, True, f"num_clients={num_clients}",
                           f"clients_per_round={CLIENTS_PER_ROUND}", f"rounds={rounds}",
                           "local_steps=2", "sample.every=0", "checkpoint.every=0",
                           f"client.algorithm={algorithm}")
        started = time.perf_counter()
        simulator.run(cfg)
        seconds = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        records = [r for r in read_metrics(run_dir) if "round_time_s" in r]
        plain = [r["round_time_s"] for r in records[:-1]] or [records[-1]["round_time_s"]]  # last: grid + checkpoint
        store = ClientStateStore(run_dir)
        conn.send({"num_clients": num_clients, "algorithm": algorithm, "rounds": rounds,
                   "peak_rss_mib": peak_kib / 1024, "rss_at_fork_mib": start_kib / 1024,
                   "growth_mib": (peak_kib - start_kib) / 1024, "seconds": seconds,
                   "round_s": common.summarize(plain), "model_params": int(records[-1].get(
                       "bytes_sent_per_client", 0)) // 4,
                   "state_disk_bytes": store.nbytes(), "clients_with_state": len(store.clients()),
                   "state_files": len(list(store.root.rglob("*.safetensors"))) if store.root.is_dir() else 0,
                   **spent})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"num_clients": num_clients, "algorithm": algorithm, "error": repr(exc)})
    finally:
        conn.close()


def _children(algorithm: str, rounds: int, workdir: Path) -> list:
    context = multiprocessing.get_context("fork")
    rows = []
    for num_clients in COUNTS:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_memory_child,
                                args=(num_clients, algorithm, rounds, str(workdir), send))
        child.start()
        send.close()
        rows.append(receive.recv())
        child.join()
        if "error" in rows[-1]:
            raise RuntimeError(f"memory child {algorithm} C={num_clients} failed: {rows[-1]['error']}")
    return rows


def _import_before_fork() -> None:
    """Import everything a run touches before forking, so "growth" is the run's own state
    (model, optimizer, data, buffers, client states) and not lazily imported modules."""
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: F401

    import fedrun.engine.checkpoint  # noqa: F401
    import fedrun.engine.client_state  # noqa: F401
    import fedrun.eval.sampling  # noqa: F401
    import fedrun.engine.simulator  # noqa: F401
    import fedrun.data.digits  # noqa: F401


def memory_vs_clients(quick: bool, workdir: Path) -> dict:
    rounds = _memory_rounds(quick)
    _import_before_fork()
    rows = _children("fedavg", rounds, workdir)
    peaks = [r["peak_rss_mib"] for r in rows]
    return {
        "what": "peak RSS of one rank (world size 1: it trains every sampled client) vs C",
        "config": f"tests' tiny 8x8 U-Net on all training digits, K={CLIENTS_PER_ROUND}, E=2, "
                  f"{rounds} rounds, final sample grid + checkpoint + export",
        "clients_per_round": CLIENTS_PER_ROUND, "rounds": rounds, "rows": rows,
        "spread_pct": 100.0 * (max(peaks) - min(peaks)) / min(peaks),
        "goal": "flat within 5 %",
    }


# ---------------------------------------------------------------- 7. client state store

def state_store(quick: bool, workdir: Path, stateless_rows: list) -> dict:
    """The same runs as the memory benchmark with a stateful client algorithm (bench_stateful:
    one vector of P floats per client in the client state store): peak RSS, bytes on disk, and
    the time of the store's load + save per round, against the stateless fedavg rows."""
    from bench.algorithms import STATEFUL

    rounds = _memory_rounds(quick)
    _import_before_fork()
    rows = _children(STATEFUL, rounds, workdir)
    for row, base in zip(rows, stateless_rows):
        params = row["model_params"]
        row["state_bytes_each"] = 4 * params
        row["store_s_per_round"] = (row["load_s"] + row["save_s"]) / rounds
        row["fedavg_peak_rss_mib"] = base["peak_rss_mib"]
        row["rss_vs_fedavg_mib"] = row["peak_rss_mib"] - base["peak_rss_mib"]
        row["fedavg_round_s"] = base["round_s"]
        row["round_ratio_vs_fedavg"] = row["round_s"]["median"] / base["round_s"]["median"]
        row["store_share_of_round"] = row["store_s_per_round"] / row["round_s"]["median"]
    peaks = [r["peak_rss_mib"] for r in rows]
    return {
        "what": "client state store: peak RSS of one rank, disk bytes of client_state/, load+save "
                "time per round; bench_stateful (state = 1 vector of P fp32) vs stateless fedavg",
        "config": f"tests' tiny 8x8 U-Net, K={CLIENTS_PER_ROUND}, E=2, {rounds} rounds, world size 1, "
                  "checkpoint at the last round (which prunes versions no kept checkpoint needs)",
        "algorithm": STATEFUL, "clients_per_round": CLIENTS_PER_ROUND, "rounds": rounds, "rows": rows,
        "spread_pct": 100.0 * (max(peaks) - min(peaks)) / min(peaks),
        "expectation": "RSS flat in C; disk = clients with state x 4P bytes x versions kept",
    }


# ---------------------------------------------------------------- 6. exact sums: accuracy

def _grouped_sum(groups, cohort, locals_, global_weights, weights, exact: bool):
    """Sum the clients of ``groups`` as ranks would: one RoundBuffer per group (a rank), the
    buffers added (a SUM all-reduce), the total decoded. Returns the decoded sum of n_c delta_c."""
    from fedrun.fl.aggregation.buffer import ExactGrid, RoundBuffer
    from fedrun.fl.aggregation.transforms import NonFiniteGuard

    numel = global_weights.numel()
    partials = []
    for group in groups:
        grids = ({"update": ExactGrid(numel, global_weights, sum(weights), "cpu")} if exact else None)
        buffer = RoundBuffer(numel, cohort, len(groups), "cpu", exact=grids,
                             transforms=[NonFiniteGuard()])
        for client in group:
            if not buffer.add_client(client, locals_[client], global_weights, weights[client], 0.5, 64):
                raise RuntimeError(f"client {client}'s update was rejected")
        partials.append(buffer)
    total = partials[0]
    for other in partials[1:]:
        total.buffer.add_(other.buffer)
    return total.decode().update_sum.clone()


def exact_accuracy(quick: bool) -> dict:
    """Relative error of the decoded round sum vs a float64 reference, exact vs fp32, on the
    digits U-Net's global weights with updates of ~1e-3; and whether the decoded sum is the same
    bits when the 5 clients are grouped as 1, 2 or 3 ranks would hold them."""
    from fedrun.config import load_config
    from fedrun.engine.flat import FlatParameters
    from fedrun.tasks.ddpm.model import build_unet

    cfg = load_config(configs.DIGITS, configs.TINY_MODEL if quick else [])
    unet = build_unet(cfg.model, cfg.data.image_size, 1, cfg.seed)
    global_weights = FlatParameters(unet).flat.detach().clone()
    generator = torch.Generator().manual_seed(1)
    clients = 5
    weights = [324.0, 323.0, 324.0, 323.0, 323.0]  # 1,617 training digits over 5 clients
    locals_ = [global_weights + 1e-3 * torch.randn(global_weights.numel(), generator=generator)
               for _ in range(clients)]
    reference = sum(w * (x.double() - global_weights.double()) for w, x in zip(weights, locals_))
    cohort = list(range(clients))
    groupings = {"1 rank (5)": [[0, 1, 2, 3, 4]], "2 ranks (3+2)": [[0, 1, 2], [3, 4]],
                 "3 ranks (2+2+1)": [[0, 1], [2, 3], [4]]}
    out = {"model_params": global_weights.numel(), "clients": clients, "weights": weights,
           "update_scale": 1e-3, "groupings": list(groupings)}
    ref_norm, ref_abs = float(reference.norm()), reference.abs()
    for mode, exact in (("exact", True), ("fp32", False)):
        sums = {name: _grouped_sum(groups, cohort, locals_, global_weights, weights, exact)
                for name, groups in groupings.items()}
        first = next(iter(sums.values()))
        errors = {}
        for name, decoded in sums.items():
            diff = (decoded.double() - reference).abs()
            errors[name] = {
                "relative_l2": float(diff.norm()) / ref_norm,
                "median_relative": float((diff / ref_abs.clamp(min=1e-30)).median()),
                "max_abs_over_max_ref": float(diff.max()) / float(ref_abs.max()),
            }
        out[mode] = {
            "errors": errors,
            "bit_identical_across_groupings": all(torch.equal(first, x) for x in sums.values()),
            "coords_differing_from_1_rank": {name: int((x != first).sum()) for name, x in sums.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("local_compute", "memory", "accuracy"), default=None)
    args = parser.parse_args()
    result = {"load_before": common.loadavg()}
    with tempfile.TemporaryDirectory(prefix="fedrun-bench-") as tmp:
        # Memory first: the children are forked before this process has run any torch compute.
        if args.only in (None, "memory"):
            result["memory"] = memory_vs_clients(args.quick, Path(tmp))
            result["state_store"] = state_store(args.quick, Path(tmp), result["memory"]["rows"])
        if args.only in (None, "accuracy"):
            result["exact_accuracy"] = exact_accuracy(args.quick)
        if args.only in (None, "local_compute"):
            result["local_compute"] = local_compute(args.quick, Path(tmp))
    result["load_after"] = common.loadavg()
    common.write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
