"""Start-up: launch -> end of round 1 of a 2-rank ``fedrun train`` (torchrun), against a bare
2-process torch script doing the same job, and optionally against another fedrun checkout.

    python -m bench.startup [--repeats 5] [--before PATH_OF_OTHER_CHECKOUT] [--out FILE]

Each repeat launches every variant once, in rotating order; a variant's time is from launching
torchrun to the first line of its metrics.jsonl (the bare script: to its marker file), polled
every 20 ms. The job: the default digits config, 4 clients, E = 4, 1 round, no W&B, a 4-image
grid. Reported: per-repeat ratios and differences in seconds (e.g. fedrun - bare), each as
median [min-max] over the repeats.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common, configs

JOB = ["rounds=1", "local_steps=4", "logging.wandb=false", "logging.progress=false",
       "sample.num_images=4", "sample.steps=2", "checkpoint.every=0"]

BARE = r'''
import os, sys, time
import torch, torch.distributed as dist
from diffusers import UNet2DModel, DDPMScheduler
from sklearn.datasets import load_digits
import numpy as np
dist.init_process_group("gloo"); torch.set_num_threads(1)
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.from_numpy(load_digits().images.astype(np.float32) / 8 - 1)[:, None]
x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear")
torch.manual_seed(0)
unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
sched = DDPMScheduler()
params = [p for p in unet.parameters()]
w = torch.cat([p.detach().reshape(-1) for p in params])
total = torch.zeros_like(w)
for client in range(rank, 4, world):  # 2 clients per rank, E = 4 steps each
    torch.nn.utils.vector_to_parameters(w.clone(), params)
    opt = torch.optim.AdamW(params, lr=2e-3)
    g = torch.Generator().manual_seed(client)
    for _ in range(4):
        b = x[torch.randint(len(x), (16,), generator=g)]
        noise = torch.randn(b.shape, generator=g); t = torch.randint(0, 1000, (16,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(b, noise, t), t).sample, noise)
        opt.zero_grad(); loss.backward(); opt.step()
    total += torch.nn.utils.parameters_to_vector(params) - w
dist.all_reduce(total)
if rank == 0:
    open(sys.argv[1], "w").write("done")
dist.destroy_process_group()
'''


def _launch(cmd, env, marker: Path, cwd, timeout: float = 300) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not (marker.exists() and marker.stat().st_size > 0):
        if proc.poll() is not None and not marker.exists():
            raise SystemExit(f"startup: {' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
        if time.perf_counter() - started > timeout:
            proc.kill()
            raise SystemExit(f"startup: {' '.join(cmd)} timed out")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    proc.wait()
    return elapsed


def _imported_fedrun(checkout: str) -> str:
    """The fedrun package a variant's ranks import (they run from ``checkout`` with it on
    PYTHONPATH); refuses to time a variant that would run other code."""
    env = common.bench_env({"PYTHONPATH": checkout})
    found = subprocess.run([sys.executable, "-c", "import fedrun; print(fedrun.__file__)"], cwd=checkout,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if Path(found).resolve().parent.parent != Path(checkout).resolve():
        raise SystemExit(f"startup: from {checkout}, `import fedrun` finds {found}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="another fedrun checkout to compare (e.g. a worktree of "
                                         "an older commit)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    variants = {"fedrun": str(configs.REPO)}
    if args.before:
        variants["before"] = str(Path(args.before).resolve())
    imported = {name: _imported_fedrun(path) for name, path in variants.items()}
    times = {name: [] for name in [*variants, "bare"]}
    with tempfile.TemporaryDirectory(prefix="fedrun-startup-") as tmp:
        script = Path(tmp) / "bare.py"
        script.write_text(BARE)
        for repeat in range(args.repeats):
            order = list(times)[repeat % len(times):] + list(times)[:repeat % len(times)]
            for name in order:
                out = Path(tmp) / f"{name}{repeat}"
                if name == "bare":
                    marker = out.with_suffix(".done")
                    cmd, env = torchrun + [str(script), str(marker)], common.bench_env()
                else:
                    marker = out / "metrics.jsonl"
                    cmd = torchrun + ["-m", "fedrun", "train", "--config", configs.DIGITS, *JOB,
                                      f"output_dir={out}"]
                    env = common.bench_env({"PYTHONPATH": variants[name]})
                # cwd = the variant's checkout: `python -m fedrun` puts the working directory
                # before PYTHONPATH, so from this checkout --before would run this code too.
                cwd = configs.REPO if name == "bare" else variants[name]
                times[name].append(_launch(cmd, env, marker, cwd))
            print(f"startup repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    pairs = [(a, b) for a, b in [("fedrun", "bare"), ("fedrun", "before"), ("before", "bare")]
             if a in times and b in times]
    ratios = {f"{a}/{b}": [x / y for x, y in zip(times[a], times[b])] for a, b in pairs}
    differences = {f"{a}-{b}": [x - y for x, y in zip(times[a], times[b])] for a, b in pairs}
    result = {"command": "python -m bench.startup " + " ".join(argv or sys.argv[1:]),
              "commit": common.git_commit(), "machine": common.machine(), "load": common.loadavg(),
              "fedrun_imported": imported,
              "seconds": times, "seconds_median": {k: common.summarize(v) for k, v in times.items()},
              "ratios": {k: common.summarize(v) for k, v in ratios.items()},
              "differences_s": differences,
              "differences_s_median": {k: common.summarize(v) for k, v in differences.items()}}
    if args.out:
        common.write_json(Path(args.out), result)
    for key, stats in result["ratios"].items():
        print(f"{key}: median {stats['median']:.3f} [{stats['min']:.3f}-{stats['max']:.3f}]", file=sys.stderr)
    for key, stats in result["differences_s_median"].items():
        print(f"{key}: median {stats['median']:+.2f} s [{stats['min']:+.2f} to {stats['max']:+.2f}]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
