"""The CPU-scale federated LoRA experiment, end to end, with nothing downloaded.

    python -m scripts.lora_demo --out runs/lora_demo --results docs/results/lora_digits

Both cores (each run uses the machine's cores as threads), the fine-tuning stage repeated for
3 seeds, 256 samples per prompt: about 35-60 min on a 2-core CPU; results and their note in
docs/results/lora_digits/ (``--seeds 0 --samples-per-prompt 64`` is a quick look).

The paper fine-tunes Stable Diffusion 1.5 with LoRA on 16 photos of one dog, 4 clients x 4
images. Here, at the scale of one CPU core:

1. data: the embedded digits (16x16) 0-8 with captions "a photo of the digit three" (a folder
   with metadata.jsonl), and 16 images of the digit nine, which the base model never sees.
2. base model parts: a word-level CLIP tokenizer and a small CLIP text encoder (frozen, random),
   a small AutoencoderKL trained here on digits 0-8, a small UNet2DConditionModel, saved as a
   StableDiffusionPipeline folder (``fedrun.tasks.sd_lora.tiny_sd``).
3. pre-training, federated: ``fedrun finetune`` in mode 'full' (the whole U-Net, text-
   conditioned, 10% empty prompts for classifier-free guidance) on digits 0-8, 4 clients
   (configs/lora_digits_pretrain.yaml). Its final/ is a whole pipeline: the "pre-trained SD".
4. federated LoRA fine-tuning: ``fedrun finetune`` on the 16 nines with the new instance prompt
   "a photo of sks digit", 4 clients x 4 images (configs/lora_digits_nine.yaml: the paper's
   recipe), and the same with DreamBooth prior preservation on 16 samples of the base model per
   digit prompt 0-8 (configs/lora_digits_nine_prior.yaml).
5. measurement with the shipped digits classifier: the share of samples for the instance prompt
   classified as nine with the base pipeline and with the LoRA loaded by stock
   ``pipe.load_lora_weights(final)``, and prior preservation: for each prompt "a photo of the
   digit k" (k = 0..8) the share classified as k, before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedrun.tasks.sd_lora.tiny_sd import DIGIT_WORDS

REPO = Path(__file__).resolve().parents[1]
INSTANCE_PROMPT = "a photo of sks digit"
SUBJECT_DIGIT = 9
NUM_SUBJECT_IMAGES = 16


def digit_prompt(k: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[k]}"


def _say(message: str) -> None:
    print(f"[lora_demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_data(root: Path, seed: int = 0) -> tuple:
    """Digits 0-8 with captions, and 16 nines, as PNG folders (16x16 grayscale)."""
    from PIL import Image

    from fedrun.config import DataConfig
    from fedrun.data import build_datasets

    data, _ = build_datasets(DataConfig(image_size=16, heldout_fraction=0.0), seed)
    pixels = ((data.get_batch(np.arange(len(data))) + 1) * 127.5).round().clamp(0, 255)
    pixels = pixels.to(torch.uint8)[:, 0].numpy()
    prior, subject = root / "digits_0_8", root / "nine"
    prior.mkdir(parents=True, exist_ok=True)
    subject.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(pixels, data.labels)):
        if label == SUBJECT_DIGIT:
            continue
        name = f"{i:04d}.png"
        Image.fromarray(image, mode="L").save(prior / name)
        lines.append(json.dumps({"file_name": name, "text": digit_prompt(int(label))}))
    (prior / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    nines = np.flatnonzero(data.labels == SUBJECT_DIGIT)
    chosen = np.sort(np.random.default_rng([seed, 9]).choice(nines, NUM_SUBJECT_IMAGES, replace=False))
    for i in chosen:
        Image.fromarray(pixels[i], mode="L").save(subject / f"{i:04d}.png")
    return prior, subject


def build_base(root: Path, prior: Path, vae_steps: int, seed: int = 0) -> Path:
    """Train the VAE on digits 0-8, assemble the tiny SD pipeline (random U-Net), save it."""
    from fedrun.data.captioned import build_captioned_images
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline, train_vae

    images = build_captioned_images(str(prior), 16, True, True, None, "metadata.jsonl").images
    vae = train_vae(images, steps=vae_steps, seed=seed, log=_say)
    return build_tiny_pipeline(root, vae=vae, seed=seed)


def run_finetune(config: str, overrides: list) -> Path:
    """``fedrun finetune --config configs/CONFIG OVERRIDES...``; returns the run directory."""
    from fedrun.engine import simulator
    from fedrun.config import load_config
    from fedrun.tasks.sd_lora.task import FinetuneTask

    cfg = load_config(str(REPO / "configs" / config), overrides)
    return simulator.run(cfg, FinetuneTask(cfg))


@torch.no_grad()
def classify(images: np.ndarray) -> np.ndarray:
    """Digit predicted for each (N, H, W, 1) image in [0, 1]."""
    from fedrun.eval.classifier import load_digits_classifier

    classifier = load_digits_classifier()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
    return classifier(x).argmax(dim=1).numpy()


def measure(pipe, num_per_prompt: int, steps: int, guidance: float, seed: int) -> tuple:
    """{prompt: share classified as its target}, the sample array (instance prompt first)."""
    from fedrun.tasks.sd_lora.lora import generate

    prompts = [INSTANCE_PROMPT] + [digit_prompt(k) for k in range(SUBJECT_DIGIT)]
    targets = [SUBJECT_DIGIT] + list(range(SUBJECT_DIGIT))
    images = generate(pipe, prompts, num_per_prompt, steps, guidance, seed)
    predicted = classify(images).reshape(len(prompts), num_per_prompt)
    rates = {p: float((predicted[i] == t).mean()) for i, (p, t) in enumerate(zip(prompts, targets))}
    return rates, images, predicted


def write_prior_images(base_dir: Path, root: Path, per_digit: int, steps: int, guidance: float,
                       seed: int = 777) -> Path:
    """DreamBooth's class images: samples of the base model for "a photo of the digit k"
    (k = 0..8), with a metadata.jsonl, for prior preservation."""
    from PIL import Image

    from fedrun.tasks.sd_lora.lora import generate

    pipe = _load_pipeline(base_dir)
    prompts = [digit_prompt(k) for k in range(SUBJECT_DIGIT)]
    images = generate(pipe, prompts, per_digit, steps, guidance, seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, image in enumerate(images):
        name = f"prior_{i:04d}.png"
        Image.fromarray((image[..., 0] * 255).round().astype(np.uint8), mode="L").save(root / name)
        lines.append(json.dumps({"file_name": name, "text": prompts[i // per_digit]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _load_pipeline(base_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _summary(rates: dict, predicted: np.ndarray) -> dict:
    return {
        "nine_rate": rates[INSTANCE_PROMPT],
        "prior_preservation": float(np.mean([rates[digit_prompt(k)] for k in range(SUBJECT_DIGIT)])),
        "other_prompts_classified_nine": float((predicted[1:] == SUBJECT_DIGIT).mean()),
        "per_prompt": rates,
        "instance_prompt_predictions": np.bincount(predicted[0], minlength=10).tolist(),
    }


def evaluate(base_dir: Path, lora_dirs: dict, results: Path, num_per_prompt: int, steps: int,
             guidance: float, seed: int = 4321) -> dict:
    """Nine-rate and prior preservation of the base pipeline and of each LoRA, loaded onto it
    with stock ``load_lora_weights``; one grid per model (rows: instance prompt, digits 0-8).
    ``lora_dirs``: name -> run folder, or name -> {fine-tuning seed: run folder} (the grid is the
    first seed's; the summary gains mean and std over the seeds)."""
    from fedrun.eval.images import save_grid

    pipe = _load_pipeline(base_dir)
    results.mkdir(parents=True, exist_ok=True)
    show = min(num_per_prompt, 16)
    report = {"samples_per_prompt": num_per_prompt, "ddim_steps": steps,
              "guidance_scale": guidance, "instance_prompt": INSTANCE_PROMPT,
              "grid_rows": [INSTANCE_PROMPT] + [digit_prompt(k) for k in range(SUBJECT_DIGIT)]}
    for name, dirs in [("before", {None: None}), *lora_dirs.items()]:
        dirs = dirs if isinstance(dirs, dict) else {None: dirs}
        per_seed = {}
        for finetune_seed, lora_dir in dirs.items():
            if lora_dir is not None:
                pipe.load_lora_weights(str(lora_dir))
            rates, images, predicted = measure(pipe, num_per_prompt, steps, guidance, seed)
            if lora_dir is not None:
                pipe.unload_lora_weights()
            per_seed[finetune_seed] = _summary(rates, predicted)
            if len(per_seed) == 1:
                grid = images.reshape(10, num_per_prompt, *images.shape[1:])[:, :show]
                save_grid(grid.reshape(-1, *images.shape[1:]), results / f"{name}.png", columns=show)
        report[name] = next(iter(per_seed.values())) if None in per_seed else _over_seeds(per_seed)
    return report


def _over_seeds(per_seed: dict) -> dict:
    """Mean and (sample) std over fine-tuning seeds of each headline rate, plus every seed."""
    out = {"seeds": {str(s): r for s, r in per_seed.items()}}
    for key in ("nine_rate", "prior_preservation", "other_prompts_classified_nine"):
        values = np.array([r[key] for r in per_seed.values()])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora_demo", help="working folder of the demo")
    parser.add_argument("--results", default=None, help="also write numbers and grids here")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--samples-per-prompt", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the fine-tuning stage (each LoRA is trained once per seed)")
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="key=value",
                        help="overrides of configs/lora_digits_pretrain.yaml")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="key=value",
                        help="overrides of configs/lora_digits_nine.yaml")
    parser.add_argument("--prior-images", type=int, default=16,
                        help="class images per digit 0-8 for the prior-preservation variant (0: skip it)")
    parser.add_argument("--skip-pretrain", action="store_true",
                        help="reuse OUT/pretrain/final from an earlier run")
    args = parser.parse_args(argv)
    # One process, every core as a thread (the configs' threads=1 is for their torchrun use).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    both_cores = [f"threads={cores}"]
    out = Path(args.out)
    timings = {}
    started = time.perf_counter()
    from fedrun.engine.metrics import code_commit

    commit = code_commit()  # the code that produces the numbers (read before, not after, the run)
    prior, subject = write_data(out / "data")
    pretrained = out / "pretrain" / "final"
    if not args.skip_pretrain:
        t = time.perf_counter()
        build_base(out / "base_init", prior, args.vae_steps)
        timings["vae_and_base_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _say("federated text-conditioned pre-training on digits 0-8")
        run_finetune("lora_digits_pretrain.yaml", [
            f"finetune.pretrained={out / 'base_init'}", f"data.root={prior}",
            f"output_dir={out / 'pretrain'}", "overwrite=true", *both_cores, *args.pretrain])
        timings["pretrain_s"] = time.perf_counter() - t
    from fedrun.config import load_config

    cfg = load_config(str(REPO / "configs" / "lora_digits_nine.yaml"), args.finetune)
    recipes = {"after": ("lora_digits_nine.yaml", "lora", [])}
    if args.prior_images > 0:
        t = time.perf_counter()
        prior_root = write_prior_images(pretrained, out / "data" / "prior", args.prior_images,
                                        cfg.sample.steps, cfg.finetune.guidance_scale)
        timings["prior_images_s"] = time.perf_counter() - t
        recipes["after_prior_preservation"] = ("lora_digits_nine_prior.yaml", "lora_prior",
                                               [f"finetune.class_data_dir={prior_root}"])
    lora_dirs: dict = {name: {} for name in recipes}
    for name, (config, folder, extra) in recipes.items():
        t = time.perf_counter()
        for seed in args.seeds:
            _say(f"federated LoRA fine-tuning on 16 nines, 4 clients x 4 ({config}, seed {seed})")
            run_dir = out / f"{folder}_seed{seed}"
            run_finetune(config, [f"finetune.pretrained={pretrained}", f"data.root={subject}",
                                  f"output_dir={run_dir}", "overwrite=true", f"seed={seed}",
                                  *both_cores, *extra, *args.finetune])
            lora_dirs[name][seed] = run_dir / "final"
        timings[f"finetune_{folder}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results_dir = Path(args.results) if args.results else out / "results"
    report = evaluate(pretrained, lora_dirs, results_dir, args.samples_per_prompt,
                      cfg.sample.steps, cfg.finetune.guidance_scale)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    from fedrun.engine.metrics import read_metrics

    last = read_metrics(out / f"lora_seed{args.seeds[0]}")[-1]
    report["communication"] = {k: last[k] for k in (
        "bytes_sent_per_client", "bytes_full_unet_per_client", "bytes_ratio_vs_full_unet")}
    report["lora_aggregation_error_last_round"] = last.get("lora_aggregation_error")
    report["timings_s"] = timings
    report["finetune_seeds"] = args.seeds
    report["threads"] = cores
    report["commit"] = commit
    (results_dir / "lora_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    _say(json.dumps({k: (v if not isinstance(v, dict) else {m: w for m, w in v.items() if m != "per_prompt"})
                     for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
