"""The CPU-scale federated LoRA experiment, end to end, with nothing downloaded.

    python -m scripts.lora_demo --out runs/lora_demo --results docs/results/lora_digits
    python -m scripts.lora_demo --quick          # toy sizes, about a minute: every stage runs
    python -m scripts.lora_demo --variants fedavg ffa fedsa hetlora flora flexlora \
        --prior-images 0 --results docs/results/communication/lora   # the LoRA variants' bytes

Every core as threads, the fine-tuning repeated for 3 seeds, 256 samples per prompt: about
35-60 min on a 2-core CPU; results and their note in docs/results/lora_digits/. The stages are
runner steps (``fedrun.experiments.runner``): run again, the demo skips the finished ones.

The paper fine-tunes Stable Diffusion 1.5 with LoRA on 16 photos of one dog, 4 clients x 4
images. Here, at the scale of one CPU core:

1. data: the embedded digits (16x16) 0-8 with captions "a photo of the digit three" (a folder
   with metadata.jsonl), and 16 images of the digit nine, which the base model never sees.
2. base: a word-level CLIP tokenizer, a small frozen random CLIP text encoder, a small
   AutoencoderKL trained here on digits 0-8 and a small UNet2DConditionModel, saved as a
   StableDiffusionPipeline folder (``fedrun.tasks.sd_lora.tiny_sd``).
3. pre-training, federated: ``fedrun finetune`` in mode 'full' on digits 0-8, 4 clients
   (configs/lora_digits_pretrain.yaml). Its final/ is a whole pipeline: the "pre-trained SD".
4. federated LoRA fine-tuning on the 16 nines with the instance prompt "a photo of sks digit",
   4 clients x 4 images (configs/lora_digits_nine.yaml: the paper's recipe), and the same with
   DreamBooth prior preservation on 16 base-model samples per digit prompt 0-8
   (configs/lora_digits_nine_prior.yaml).
   With --variants, step 4 instead trains the paper's recipe once per federated LoRA variant
   (``finetune.lora_aggregation``): fedavg, ffa and fedsa at the recipe's rank 8, hetlora,
   flora and flexlora with client ranks drawn from {2, 4, 8, 16} (global rank 16); the
   report then adds each variant's bytes per client and direction.
5. measurement with the shipped digits classifier: the share of the instance prompt's samples
   classified as nine with the base pipeline and with each LoRA loaded by stock
   ``pipe.load_lora_weights(final)``, and for each prompt "a photo of the digit k" the share
   classified as k (prior preservation), before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

from fedrun.experiments.runner import execute, say
from fedrun.experiments.steps import RunSpec, read_record
from fedrun.tasks.sd_lora.tiny_sd import DIGIT_WORDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INSTANCE_PROMPT = "a photo of sks digit"
SUBJECT_DIGIT = 9
# --quick: every stage at toy size (a round of one step, one 2-step sample per prompt)
TOY = ["rounds=1", "local_steps=1", "optim.batch_size=4", "sample.every=0", "checkpoint.every=0",
       "sample.num_images=1", "sample.steps=2"]
QUICK = {"vae_steps": 2, "samples_per_prompt": 2, "seeds": [0], "prior_images": 1, "pretrain": TOY,
         "finetune": TOY}


def digit_prompt(k: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[k]}"


# ---------------------------------------------------------------- data

def write_data(root: Path, seed: int = 0) -> tuple:
    """Digits 0-8 with captions, and the 16 nines of ``write_nines``, as PNG folders (16x16)."""
    from PIL import Image

    data, pixels = _digits(16, seed)
    prior = root / "digits_0_8"
    prior.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in np.flatnonzero(data.labels != SUBJECT_DIGIT):
        Image.fromarray(pixels[i], mode="L").save(prior / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": digit_prompt(int(data.labels[i]))}))
    (prior / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return prior, write_nines(root, 16, seed=seed)[0]


def write_nines(root: Path, image_size: int, count: int = 16, seed: int = 0) -> tuple:
    """(subject, heldout) folders of ``count`` nines each, chosen by seeded draws: the subject
    of the fine-tuning, and others of the same class (the privacy report's non-members)."""
    from PIL import Image

    data, pixels = _digits(image_size, seed)
    nines = np.flatnonzero(data.labels == SUBJECT_DIGIT)
    subject = np.sort(np.random.default_rng([seed, 9]).choice(nines, count, replace=False))
    heldout = np.sort(np.random.default_rng([seed, 10]).choice(np.setdiff1d(nines, subject), count,
                                                               replace=False))
    folders = (root / "nine", root / "nine_heldout")
    for folder, chosen in zip(folders, (subject, heldout)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
    return folders


def _digits(image_size: int, seed: int) -> tuple:
    """The embedded digits and their pixels, (N, H, W) uint8."""
    import torch

    from fedrun.config import DataConfig
    from fedrun.data import build_datasets

    data, _ = build_datasets(DataConfig(image_size=image_size, heldout_fraction=0.0), seed)
    pixels = ((data.get_batch(np.arange(len(data))) + 1) * 127.5).round().clamp(0, 255)
    return data, pixels.to(torch.uint8)[:, 0].numpy()


# ---------------------------------------------------------------- steps

def build_base(spec: RunSpec) -> None:
    """Step: train the VAE on digits 0-8, assemble the tiny SD pipeline (random U-Net), save it."""
    from fedrun.data.captioned import build_captioned_images
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline, train_vae

    images = build_captioned_images(spec.params["prior"], 16, True, True, None, "metadata.jsonl").images
    vae = train_vae(images, steps=spec.params["vae_steps"], seed=0, log=lambda m: say(m, "lora_demo"))
    build_tiny_pipeline(spec.run_dir, vae=vae, seed=0)


def base_steps(out: Path, prior: Path, vae_steps: int, pretrain: List[str]) -> List[RunSpec]:
    """Build the base pipeline, then pre-train it federated: OUT/pretrain/final is the base."""
    base = RunSpec("base", "scripts.lora_demo:build_base", out / "base_init", outputs=("model_index.json",),
                   params={"prior": str(prior), "vae_steps": vae_steps})
    return [base, RunSpec("pretrain", "finetune", out / "pretrain", depends_on=[base.id],
                          config=str(CONFIGS / "lora_digits_pretrain.yaml"),
                          overrides=[f"finetune.pretrained={base.run_dir}", f"data.root={prior}", *pretrain])]


def prior_images(spec: RunSpec) -> None:
    """Step: DreamBooth's class images, samples of the base model for "a photo of the digit k"
    (k = 0..8), with a metadata.jsonl, for prior preservation."""
    from PIL import Image

    from fedrun.tasks.sd_lora.lora import generate

    per_digit, steps, guidance = spec.params["per_digit"], *_sampling(spec.params["finetune"])
    prompts = [digit_prompt(k) for k in range(SUBJECT_DIGIT)]
    images = generate(_load_pipeline(spec.params["base"]), prompts, per_digit, steps, guidance, 777)
    lines = []
    for i, image in enumerate(images):
        pixels = (image[..., 0] * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(spec.run_dir / f"prior_{i:04d}.png")
        lines.append(json.dumps({"file_name": f"prior_{i:04d}.png", "text": prompts[i // per_digit]}))
    (spec.run_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def evaluate(spec: RunSpec) -> None:
    """Step: nine-rate and prior preservation of the base pipeline and of each LoRA (loaded onto
    it with stock ``load_lora_weights``), one grid per model (rows: the instance prompt, digits
    0-8; the first seed's); each LoRA's mean and std over its fine-tuning seeds."""
    from fedrun.eval.images import save_grid

    p = spec.params
    steps, guidance = _sampling(p["finetune"])
    pipe, results, n = _load_pipeline(p["base"]), Path(p["results"]), p["per_prompt"]
    results.mkdir(parents=True, exist_ok=True)
    report = {"samples_per_prompt": n, "ddim_steps": steps, "guidance_scale": guidance,
              "instance_prompt": INSTANCE_PROMPT,
              "grid_rows": [INSTANCE_PROMPT] + [digit_prompt(k) for k in range(SUBJECT_DIGIT)]}
    for name, dirs in [("before", {"": None}), *p["loras"].items()]:
        per_seed = {}
        for seed, lora_dir in dirs.items():
            if lora_dir is not None:
                pipe.load_lora_weights(lora_dir)
            per_seed[seed], images = measure(pipe, n, steps, guidance)
            if lora_dir is not None:
                pipe.unload_lora_weights()
            if len(per_seed) == 1:
                grid = images.reshape(10, n, *images.shape[1:])[:, :min(n, 16)]
                save_grid(grid.reshape(-1, *images.shape[1:]), results / f"{name}.png", columns=min(n, 16))
        report[name] = per_seed[""] if name == "before" else _over_seeds(per_seed)
    first = next(iter(p["loras"]))
    report.update(_communication(Path(next(iter(p["loras"][first].values()))).parent))
    report["bytes"] = {name: _bytes_over_seeds(dirs) for name, dirs in p["loras"].items()}
    (spec.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")


def _bytes_over_seeds(dirs: dict) -> dict:
    """A LoRA recipe's run totals, bytes up and down over all rounds and clients (mean over its
    seeds; client ranks and so bytes differ with the seed's draw), and per client and round."""
    from fedrun.engine.metrics import read_metrics

    totals = {"up": [], "down": [], "up_per_client_round": [], "down_per_client_round": []}
    for lora_dir in dirs.values():
        records = read_metrics(Path(lora_dir).parent)
        last = records[-1]
        sends = sum(len(r["bytes_up_per_client"]) for r in records)
        totals["up"].append(last["bytes_up_total"])
        totals["down"].append(last["bytes_down_total"])
        totals["up_per_client_round"].append(last["bytes_up_total"] / sends)
        totals["down_per_client_round"].append(last["bytes_down_total"] / sends)
    return {key: float(np.mean(values)) for key, values in totals.items()}


def measure(pipe, num_per_prompt: int, steps: int, guidance: float, seed: int = 4321) -> tuple:
    """(rates: nine-rate, prior preservation, per prompt; the samples, instance prompt first)."""
    from fedrun.tasks.sd_lora.lora import generate

    prompts = [INSTANCE_PROMPT] + [digit_prompt(k) for k in range(SUBJECT_DIGIT)]
    images = generate(pipe, prompts, num_per_prompt, steps, guidance, seed)
    predicted = classify(images).reshape(len(prompts), num_per_prompt)
    rates = {p: float((predicted[i] == t).mean()) for i, (p, t) in enumerate(zip(prompts, [9, *range(9)]))}
    return {"nine_rate": rates[INSTANCE_PROMPT],
            "prior_preservation": float(np.mean([rates[p] for p in prompts[1:]])),
            "other_prompts_classified_nine": float((predicted[1:] == SUBJECT_DIGIT).mean()),
            "per_prompt": rates,
            "instance_prompt_predictions": np.bincount(predicted[0], minlength=10).tolist()}, images


def classify(images: np.ndarray) -> np.ndarray:
    """Digit predicted for each (N, H, W, 1) image in [0, 1] by the shipped classifier."""
    import torch

    from fedrun.eval.classifier import load_digits_classifier

    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
        return load_digits_classifier()(x).argmax(dim=1).numpy()


def _over_seeds(per_seed: dict) -> dict:
    """Mean and (sample) std over fine-tuning seeds of each headline rate, plus every seed."""
    out = {"seeds": per_seed}
    for key in ("nine_rate", "prior_preservation", "other_prompts_classified_nine"):
        values = np.array([r[key] for r in per_seed.values()])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def _communication(lora_run: Path) -> dict:
    """Bytes a client sent vs the full U-Net, and the aggregation error, of a LoRA run's last round."""
    from fedrun.engine.metrics import read_metrics

    last = read_metrics(lora_run)[-1]
    return {"communication": {k: last[k] for k in ("bytes_sent_per_client", "bytes_full_unet_per_client",
                                                   "bytes_ratio_vs_full_unet")},
            "lora_aggregation_error_last_round": last.get("lora_aggregation_error")}


def _sampling(finetune_overrides: List[str]) -> tuple:
    """(DDIM steps, guidance scale) of the fine-tuning config."""
    from fedrun.config import load_config

    cfg = load_config(str(CONFIGS / "lora_digits_nine.yaml"), finetune_overrides)
    return cfg.sample.steps, cfg.finetune.guidance_scale


def _load_pipeline(base_dir: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- the demo

def demo_plan(args, out: Path, threads: List[str]) -> List[RunSpec]:
    """Base and pre-training (unless --skip-pretrain), class images, a LoRA per recipe and seed,
    then the evaluation of them all."""
    prior, subject = write_data(out / "data")
    pretrained = out / "pretrain" / "final"
    steps = [] if args.skip_pretrain else base_steps(out, prior, args.vae_steps, [*threads, *args.pretrain])
    before_lora = [s.id for s in steps if s.name == "pretrain"]
    recipes = ({f"after_{v}": ("lora_digits_nine.yaml", f"lora_{v}", VARIANTS[v]) for v in args.variants}
               if args.variants else {"after": ("lora_digits_nine.yaml", "lora", [])})
    if args.prior_images > 0:
        steps.append(RunSpec("prior_images", "scripts.lora_demo:prior_images", out / "data" / "prior",
                             outputs=("metadata.jsonl",), depends_on=list(before_lora),
                             params={"base": str(pretrained), "per_digit": args.prior_images,
                                     "finetune": args.finetune}))
        before_lora.append(steps[-1].id)
        recipes["after_prior_preservation"] = ("lora_digits_nine_prior.yaml", "lora_prior",
                                               [f"finetune.class_data_dir={steps[-1].run_dir}"])
    loras: dict = {name: {} for name in recipes}
    for name, (config, folder, extra) in recipes.items():
        for seed in args.seeds:
            steps.append(RunSpec(folder, "finetune", out / f"{folder}_seed{seed}", seed=seed,
                                 config=str(CONFIGS / config), depends_on=before_lora,
                                 overrides=[f"finetune.pretrained={pretrained}", f"data.root={subject}",
                                            f"seed={seed}", *threads, *extra, *args.finetune]))
            loras[name][str(seed)] = str(steps[-1].run_dir / "final")
    return steps + [RunSpec("evaluation", "scripts.lora_demo:evaluate", out / "evaluation",
                            outputs=("evaluation.json",), depends_on=[s.id for s in steps],
                            params={"base": str(pretrained), "loras": loras, "results": str(args.results),
                                    "per_prompt": args.samples_per_prompt, "finetune": args.finetune})]


STAGES = {"base": "vae_and_base_s", "pretrain": "pretrain_s", "prior_images": "prior_images_s",
          "lora": "finetune_lora_s", "lora_prior": "finetune_lora_prior_s", "evaluation": "evaluate_s"}
# --variants: each federated LoRA variant's overrides of configs/lora_digits_nine.yaml; the
# heterogeneous ones draw each client's rank from {2, 4, 8, 16} (the global LoRA has rank 16)
_HETEROGENEOUS = ["finetune.lora_rank=16", "finetune.client_rank_choices=[2,4,8,16]"]
VARIANTS = {"fedavg": ["finetune.lora_aggregation=fedavg"], "ffa": ["finetune.lora_aggregation=ffa"],
            "fedsa": ["finetune.lora_aggregation=fedsa"],
            **{v: [f"finetune.lora_aggregation={v}", *_HETEROGENEOUS]
               for v in ("hetlora", "flora", "flexlora")}}


def timings(steps: List[RunSpec]) -> dict:
    """Wall seconds per stage, from the steps' records (also of steps finished earlier)."""
    out: dict = {}
    for spec in steps:
        seconds = (read_record(spec) or {}).get("wall_s", 0.0)
        stage = STAGES.get(spec.name, f"finetune_{spec.name}_s")
        out[stage] = out.get(stage, 0.0) + seconds
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora_demo", help="working folder of the demo")
    parser.add_argument("--results", default=None, help="numbers and grids (default OUT/results)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: does every stage run")
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
    parser.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/pretrain/final")
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                        help="train the paper's recipe once per federated LoRA variant instead")
    if parser.parse_args(argv).quick:  # toy defaults; options given still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    import torch

    # One process, every core as a thread (the configs' threads=1 is for their torchrun use).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    out, started = Path(args.out), time.perf_counter()
    args.results = Path(args.results) if args.results else out / "results"
    steps = demo_plan(args, out, [f"threads={cores}"])
    outcomes = execute(steps, say=lambda m: say(m, "lora_demo"))
    failed = [o for o in outcomes.values() if not o.ok]
    for outcome in failed:
        say(f"{outcome.spec.id}: {outcome.status}: {outcome.error}", "lora_demo")
    if failed:
        return 1
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    report["timings_s"] = {**timings(steps), "total_s": time.perf_counter() - started}
    report.update(finetune_seeds=args.seeds, threads=cores, commit=read_record(steps[-1])["commit"])
    (args.results / "lora_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    say(json.dumps({k: (v if not isinstance(v, dict) else {m: w for m, w in v.items() if m != "per_prompt"})
                    for k, v in report.items()}, indent=1), "lora_demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
