"""Train the digits classifier used for FID/KID on the embedded digits and write its weights.

    python scripts/train_digits_classifier.py --out fedrun/assets/digits_classifier.safetensors

(``fedrun.eval.classifier``: trained on the images outside the held-out reference split, so it
has never seen an image that FID/KID use as reference.)
"""

import argparse
from pathlib import Path

import torch

from fedrun.eval.classifier import WEIGHTS, train_digits_classifier


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="train the digits classifier used for FID/KID")
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic reductions: the shipped file is reproducible
    model, accuracy = train_digits_classifier(args.seed, args.epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"held-out accuracy {accuracy:.4f}; weights written to {args.out}")


if __name__ == "__main__":
    main()
