"""Fingerprints of three runs' final weights, to show that a refactoring changes no result.

    python -m bench.result_hashes [--out FILE] [--work DIR]

(a) the default job (configs/digits_fedavg.yaml) at 20 rounds, 2 torchrun ranks;
(b) federated LoRA fine-tuning of a tiny Stable Diffusion pipeline (built from configs in DIR,
    nothing downloaded), 4 clients on 2 torchrun ranks, 3 rounds;
(c) DP-FedAvg + FedAdam + FedProx, 8 clients, 4 per round (Poisson), 6 rounds, one process.
Each fingerprint is the SHA-256 over the names, dtypes, shapes and bytes of the final
checkpoint's tensor groups (model, ema, server, client_algorithm), in name order. Only the
command line is used, so the script runs unchanged on any commit whose CLI it matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common, configs

QUIET = ["logging.wandb=false", "logging.progress=false", "sample.every=0", "checkpoint.every=0",
         "overwrite=true"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "fedrun"]


def tensors_hash(folder: Path) -> str:
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        for key in sorted(tensors):
            value = tensors[key].contiguous()
            digest.update(f"{path.stem}/{key}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("round_*"))[-1]


def _run(cmd, name):
    proc = subprocess.run(cmd, cwd=configs.REPO, env=common.bench_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"result_hashes: run '{name}' failed:\n{proc.stderr[-3000:]}")


def _tiny_pipeline(work: Path) -> tuple:
    """The tests' tiny SD pipeline and 8 images of the digit nine (8x8), built once in ``work``."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline
    except ImportError:  # the layout before the redesign
        from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline
    from fedrun.config import load_config
    from fedrun.data import build_datasets

    data, _ = build_datasets(load_config(None, ["data.image_size=8", "data.heldout_fraction=0"]).data, 0)
    labels, batch = data.labels, data.get_batch
    pipeline = work / "tiny_sd"
    if not pipeline.is_dir():
        build_tiny_pipeline(pipeline, block_out_channels=(16, 32), image_size=8)
    subject = work / "subject"
    subject.mkdir(exist_ok=True)
    for i in np.flatnonzero(labels == 9)[:8]:
        pixels = ((batch([i])[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.numpy(), mode="L").save(subject / f"nine_{i}.png")
    return pipeline, subject


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedrun-hashes-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        pipeline, subject = _tiny_pipeline(work)
        jobs = {
            "default_job_20_rounds_2_ranks": TORCHRUN + [
                "train", "--config", configs.DIGITS, "rounds=20", *QUIET, f"output_dir={work / 'a'}"],
            "tiny_sd_lora_2_ranks": TORCHRUN + [
                "finetune", "data.name=image_folder", f"data.root={subject}", "data.image_size=8",
                "data.grayscale=true", f"finetune.pretrained={pipeline}",
                "finetune.instance_prompt=a photo of sks digit", "finetune.lora_rank=4",
                "num_clients=4", "local_steps=2", "rounds=3", "optim.batch_size=2", "optim.lr=1e-2",
                "ema.enabled=false", "sample.num_images=2", "sample.steps=2",
                "finetune.aggregation_error_every=0", *QUIET, f"output_dir={work / 'b'}"],
            "dp_fedadam_fedprox": [sys.executable, "-m", "fedrun", "train", "--config", configs.DIGITS,
                                   *configs.TINY_MODEL, "data.max_samples=400", "num_clients=8",
                                   "clients_per_round=4", "rounds=6", "privacy.enabled=true",
                                   "privacy.noise_multiplier=0.5", "server.weighting=uniform",
                                   "server.strategy=fedadam", "client.algorithm=fedprox",
                                   "client.prox_mu=0.1", *QUIET, f"output_dir={work / 'c'}"],
        }
        hashes = {}
        for name, cmd in jobs.items():
            _run(cmd, name)
            run_dir = work / {"default_job_20_rounds_2_ranks": "a", "tiny_sd_lora_2_ranks": "b",
                              "dp_fedadam_fedprox": "c"}[name]
            hashes[name] = tensors_hash(_final_checkpoint(run_dir))
            print(f"{name}: {hashes[name]}", file=sys.stderr, flush=True)
    result = {"command": "python -m bench.result_hashes", "commit": common.git_commit(),
              "hashes": hashes}
    if args.out:
        common.write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
