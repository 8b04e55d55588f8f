"""The prepared device check: fedrun's CUDA path on one GPU, in at most 8 minutes.

    python -m bench.gpu              # on a GPU machine: writes docs/benchmarks/gpu/{results.json,README.md}
    python -m bench.gpu --dry-run    # every part at toy size on CPU (in the tests): runs/bench-gpu-dry/

Parts (each isolated: a failing part is recorded and the others still run):
  cuda_tests   pytest -m cuda (tests/integration/test_cuda.py; all skipped without CUDA)
  pretrain     the paper's 64x64 U-Net (configs/celeba_fedavg.yaml, 25 M parameters) on generated
               64x64 images: 1 rank, and 4 ranks sharing the GPU (gloo, buffer staged through
               pinned CPU memory), fp32 and bf16: local steps/s, round breakdown, peak GPU memory
  central      the same U-Net, same batch: a bare torch loop vs ``fedrun central`` (accelerate)
               on the same GPU; and fedrun's federated local steps vs the bare loop
  lora         a rank-8 LoRA training step on an SD-1.5-sized UNet2DConditionModel built from its
               config with random weights (nothing downloaded), fp16 and bf16 base

Dry run: 8x8 images and the test suite's tiny U-Net, 2 ranks instead of 4, a tiny conditional
U-Net, CPU and bf16 only. On the GPU machine, offline, with torch but without diffusers,
omegaconf and wandb: carry those as wheels and install fedrun with ``pip install --no-deps -e .``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from bench import common, configs

PAPER_ROUNDS, TOY_ROUNDS = 6, 3
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
TOY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)


# ---------------------------------------------------------------- settings per size

def _run_overrides(dry: bool, out: Path, data: Path, precision: str) -> List[str]:
    size = (configs.TINY_MODEL + [f"rounds={TOY_ROUNDS}", "local_steps=2"]) if dry else \
        [f"rounds={PAPER_ROUNDS}", "local_steps=4", "sample.num_images=4", "sample.steps=5"]
    return ["logging.wandb=false", "logging.progress=false", "overwrite=true",
            "data.name=image_folder", f"data.root={data}", "data.heldout_fraction=0",
            "num_clients=4", f"precision={precision}", f"output_dir={out}", *size] \
        + (["threads=1"] if dry else [])


PRECISIONS = ("fp32", "bf16")


def _base(dry: bool) -> str:
    """The paper's CelebA config; a dry run shrinks the digits config's two-block U-Net instead."""
    return configs.DIGITS if dry else configs.CELEBA


def make_images(folder: Path, count: int, size: int) -> Path:
    """``count`` random-ish RGB images (smooth blobs, so the U-Net has something to learn)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.linspace(-1, 1, size)
    for i in range(count):
        cx, cy, r = rng.uniform(-0.5, 0.5, 2).tolist() + [rng.uniform(0.2, 0.6)]
        mask = ((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) < r * r
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[mask] = (rng.uniform(0, 255, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.png")
    return folder


# ---------------------------------------------------------------- worker (under torchrun)

def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _round_stats(run_dir: Path, steps_per_round: int, batch: int) -> dict:
    """Breakdown of the rounds after the first (warm-up), from metrics.jsonl."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    local = _median([r["local_compute_s"] for r in records])
    return {
        "rounds_measured": len(records),
        "round_time_s": _median([r["round_time_s"] for r in records]),
        "local_compute_s": local,
        "aggregation_s": _median([r.get("aggregation_s", 0.0) for r in records]),
        "server_s": _median([r.get("server_s", 0.0) for r in records]),
        "local_steps_per_s": steps_per_round / local if local > 0 else None,
        "images_per_s": steps_per_round * batch / local if local > 0 else None,
        "gpu_peak_mib": max((r.get("gpu_peak_bytes", 0) for r in records), default=0) / 2**20 or None,
    }


def worker_pretrain(dry: bool, work: Path, data: Path) -> dict:
    import torch

    from fedrun.engine import dist
    from fedrun.engine import simulator
    from fedrun.config import load_config

    world = dist.world_size()
    out: Dict[str, dict] = {}
    for precision in PRECISIONS:
        cfg = load_config(_base(dry), _run_overrides(dry, work / f"pretrain_w{world}_{precision}",
                                                     data, precision))
        if dist.is_initialized():
            dist.barrier()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        simulator.run(cfg)
        wall = time.perf_counter() - started
        if dist.rank() == 0:
            steps = cfg.cohort_size * cfg.local_steps  # steps of one round, over all ranks
            out[precision] = {"wall_s": wall, "world_size": world, "backend": dist.describe(),
                              **_round_stats(Path(cfg.output_dir), steps, cfg.optim.batch_size)}
    return out


def _bare_steps_per_s(cfg, steps: int) -> float:
    """A bare PyTorch loop: the same U-Net, AdamW, batch and loss, no fedrun around it."""
    import torch

    from fedrun.fl.local import autocast
    from fedrun.tasks.diffusion import build_noise_scheduler, diffusion_loss
    from fedrun.tasks.ddpm.model import build_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet(cfg.model, cfg.data.image_size, 3, cfg.seed).to(device)
    scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)
    images = torch.rand(cfg.optim.batch_size, 3, cfg.data.image_size, cfg.data.image_size,
                        device=device) * 2 - 1
    generator = torch.Generator().manual_seed(0)

    def one():
        with autocast(device, cfg.precision):
            loss = diffusion_loss(unet, scheduler, images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    for _ in range(2):  # warm-up
        one()
    return steps / common.timed(lambda: [one() for _ in range(steps)], device)


def worker_central(dry: bool, work: Path, data: Path) -> dict:
    from fedrun.engine.central import run_central
    from fedrun.config import load_config

    out = {}
    for precision in PRECISIONS:
        cfg = load_config(_base(dry), _run_overrides(dry, work / f"central_{precision}", data,
                                                     precision))
        run_central(cfg)
        records = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = records[1]["steps"] - records[0]["steps"] if len(records) > 1 else records[0]["steps"]
        central = steps / _median([r["local_compute_s"] for r in records[1:]] or [records[0]["local_compute_s"]])
        bare = _bare_steps_per_s(cfg, 4 if dry else 24)
        out[precision] = {"central_steps_per_s": central, "bare_steps_per_s": bare,
                          "central_over_bare": central / bare}
    return out


def worker_lora(dry: bool) -> dict:
    """Rank-8 LoRA steps on an SD-1.5-sized conditional U-Net (random weights), per base dtype."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fedrun.engine.flat import FlatParameters
    from fedrun.tasks.sd_lora.lora import attach_lora
    from fedrun.tasks.diffusion import diffusion_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bf16": torch.bfloat16} if dry else {"fp16": torch.float16, "bf16": torch.bfloat16}
    spec = TOY_UNET if dry else SD15_UNET
    batch, steps = (2, 2) if dry else (4, 10)
    out = {}
    for name, dtype in dtypes.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec).to(device, dtype)
        lora = attach_lora(unet, 8, None, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
        params = FlatParameters(unet)
        optimizer = torch.optim.AdamW(params.params, lr=1e-4)
        scheduler = DDPMScheduler()
        latents = torch.randn(batch, 4, spec["sample_size"], spec["sample_size"], device=device)
        context = torch.randn(batch, 77, spec["cross_attention_dim"], device=device)
        generator = torch.Generator().manual_seed(0)

        def one():
            with torch.autocast(device.type, dtype=dtype):
                loss = diffusion_loss(unet, scheduler, latents, generator, encoder_hidden_states=context)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        one()  # warm-up
        seconds = common.timed(lambda: [one() for _ in range(steps)], device)
        out[name] = {"unet_parameters": sum(p.numel() for p in unet.parameters()) - lora,
                     "lora_parameters": lora, "batch": batch, "steps_per_s": steps / seconds,
                     "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}
    return out


def worker(args) -> int:
    from fedrun.engine import dist

    dist.init("auto", timeout_s=600, threads=1 if args.dry_run else None)
    work, data = Path(args.workdir), Path(args.data)
    report: dict = {"world_size": dist.world_size()}
    parts = args.parts.split(",")
    for part, run in (("pretrain", lambda: worker_pretrain(args.dry_run, work, data)),
                      ("central", lambda: worker_central(args.dry_run, work, data)),
                      ("lora", lambda: worker_lora(args.dry_run))):
        if part in parts:
            try:
                report[part] = run()
            except Exception as exc:  # noqa: BLE001  (recorded; the other parts still run)
                report[part] = {"error": f"{type(exc).__name__}: {exc}"}
    if dist.rank() == 0:
        common.write_json(Path(args.worker), report)
    dist.destroy()
    return 0


# ---------------------------------------------------------------- driver

def _launch(cmd: List[str], log: Path, timeout: int, env: dict | None = None) -> dict:
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=configs.REPO, env=common.bench_env(env), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"exit": code, "wall_s": time.perf_counter() - started,
            "log_tail": log.read_text()[-1500:] if code != 0 else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on CPU")
    parser.add_argument("--out", help="output folder (default: docs/benchmarks/gpu, or "
                                      "runs/bench-gpu-dry with --dry-run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="pretrain,central,lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device; use --dry-run to exercise the parts on CPU")
    out = Path(args.out or (configs.REPO / ("runs/bench-gpu-dry" if dry else "docs/benchmarks/gpu")))
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = make_images(work / "images", 64 if dry else 256, 8 if dry else 64)
    results = {"command": "python -m bench.gpu" + (" --dry-run" if dry else ""),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": common.git_commit(), "machine": common.machine(), "dry_run": dry,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "steps": {}}
    results["steps"]["cuda_tests"] = _launch(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/integration/test_cuda.py"],
        work / "cuda_tests.log", 300)
    results["cuda_tests_summary"] = (work / "cuda_tests.log").read_text().strip().splitlines()[-1:]
    shared = 2 if dry else 4  # ranks sharing the one GPU
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for nproc, parts in ((1, "pretrain,central,lora"), (shared, "pretrain")):
        report = work / f"worker{nproc}.json"
        # CPU ranks in a dry run take the staged path that ranks sharing a GPU take.
        env = {"FEDRUN_STAGE_COLLECTIVES": "1"} if dry and nproc > 1 else None
        results["steps"][f"worker{nproc}"] = _launch(
            torchrun + [f"--nproc_per_node={nproc}", "-m", "bench.gpu", "--worker", str(report),
                        "--workdir", str(work), "--data", str(data), "--parts", parts]
            + (["--dry-run"] if dry else []), work / f"worker{nproc}.log", 420 if not dry else 300,
            env)
        results[f"ranks{nproc}"] = json.loads(report.read_text()) if report.is_file() else None
    results["total_wall_s"] = time.perf_counter() - started
    common.write_json(out / "results.json", results)
    (out / "README.md").write_text(render(results))
    print(f"bench.gpu: wrote {out}/results.json and README.md in {results['total_wall_s']:.0f} s",
          file=sys.stderr)
    return 0 if all(s["exit"] == 0 for s in results["steps"].values()) else 1


def _rows(part) -> list:
    """(name, row) pairs of a part's results; a part that failed as a whole is one error row."""
    if not part:
        return []
    if "error" in part:
        return [("all", {"error": part["error"]})]
    return list(part.items())


def _fmt(value, spec=".3g") -> str:
    return "–" if value is None else format(value, spec)


def _table(title: str, columns: List[str], rows: list, cells) -> List[str]:
    """A markdown table; ``cells(name, row)`` gives a row's cells, an error row spans them."""
    lines = ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, row in rows:
        values = [f"error: {row['error']}"] if "error" in row else cells(name, row)
        lines.append("| " + " | ".join([str(name), *values]) + " |")
    return lines


def render(results: dict) -> str:
    """The results as a markdown page."""
    lines = [f"# fedrun on {'CPU (dry run)' if results['dry_run'] else results['gpu']}", "",
             f"`{results['command']}` at commit `{results['commit']}`, {results['date']}, "
             f"{results['total_wall_s']:.0f} s.", "",
             f"CUDA tests: {' '.join(results['cuda_tests_summary'])}"]
    pretrain = [(f"{key[5:]} | {precision}", row) for key in sorted(k for k in results if k.startswith("ranks"))
                for precision, row in _rows((results[key] or {}).get("pretrain"))]
    lines += _table("## Paper U-Net pre-training (rounds after the first; medians)",
                    ["ranks", "precision", "local steps/s", "images/s", "round s", "local s",
                     "aggregation s", "server s", "peak GPU MiB"], pretrain,
                    lambda _, r: [_fmt(r["local_steps_per_s"]), _fmt(r["images_per_s"]),
                                  _fmt(r["round_time_s"]), _fmt(r["local_compute_s"]),
                                  _fmt(r["aggregation_s"]), _fmt(r["server_s"]),
                                  _fmt(r["gpu_peak_mib"], ".0f")])
    one = results.get("ranks1") or {}
    lines += _table("## fedrun central (accelerate) vs a bare loop, same U-Net and batch",
                    ["precision", "central steps/s", "bare steps/s", "central / bare"],
                    _rows(one.get("central")),
                    lambda _, r: [_fmt(r["central_steps_per_s"]), _fmt(r["bare_steps_per_s"]),
                                  _fmt(r["central_over_bare"])])
    lines += _table("## Rank-8 LoRA step on an SD-1.5-sized UNet2DConditionModel (random weights)",
                    ["base dtype", "U-Net params", "LoRA params", "batch", "steps/s", "peak GPU MiB"],
                    _rows(one.get("lora")),
                    lambda _, r: [f"{r['unet_parameters']:,}", f"{r['lora_parameters']:,}",
                                  str(r["batch"]), _fmt(r["steps_per_s"]), _fmt(r["gpu_peak_mib"], ".0f")])
    failed = {k: v for k, v in results["steps"].items() if v["exit"] != 0}
    if failed:
        lines += ["", "## Failed steps", ""] + [f"- `{k}`: exit {v['exit']}\n\n```\n{v['log_tail']}\n```"
                                               for k, v in failed.items()]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
