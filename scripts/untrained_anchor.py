"""The anchor of an untrained model: the same architecture, sampler and number of samples as a
config's evaluation, with the weights it starts from. A score near it says the model learnt
nothing this metric can see.

    python -m scripts.untrained_anchor --config configs/digits_fedavg.yaml [key=value ...]

Prints two JSON lines: the grid key ``untrained`` (fid, kid and, with the digits features, the
confident-sample rate, the classes covered, the class TV, the TSTR accuracy when scored and, with
data.classes a subset, the share of the samples in those classes: paste it into a grid file), then
every score with its real-vs-real floor and the sample count. DDPM configs (task ddpm).
"""

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from fedrun.config import load_config
    from fedrun.data import build_datasets
    from fedrun.eval.features import build_evaluator, to_model_range
    from fedrun.experiments.collect import in_classes
    from fedrun.experiments.grid import ANCHOR_METRICS
    from fedrun.tasks.ddpm.model import build_unet
    from fedrun.tasks.diffusion import build_noise_scheduler, generate

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides, task="ddpm")
    train, heldout = build_datasets(cfg.data, cfg.seed)
    unet = build_unet(cfg.model, cfg.data.image_size, train.num_channels, cfg.seed).eval()
    images = generate(unet, build_noise_scheduler(cfg.diffusion), cfg.eval)
    record = build_evaluator(cfg.eval, train, heldout).report(to_model_range(images))
    share = in_classes(record)  # data.classes a subset: the samples' share in those classes
    if share is not None:
        record["in_classes"] = share
    print(json.dumps({"untrained": {key: round(record[key], 4) for key in ANCHOR_METRICS if key in record}}))
    print(json.dumps({key: value for key, value in record.items()
                      if not isinstance(value, list) and key != "eval_warning"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
