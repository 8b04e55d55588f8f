"""fedrun: federated training and fine-tuning of diffusion models over torch.distributed.

Launch:
    python -m fedrun train --config configs/digits_fedavg.yaml [key=value ...]      # 1 process
    torchrun --nproc_per_node=4 -m fedrun train --config configs/digits_fedavg.yaml   # 4 ranks
    fedrun train --config configs/digits_fedavg.yaml rounds=50 num_clients=8 output_dir=runs/c8

Overrides are dotted config keys (``data.image_size=32``, ``logging.wandb=false``); see
``fedrun train --help`` and the README's configuration reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from fedrun.errors import FedrunError

# Each verb: help text, a function adding its own arguments, the function running it.
# Verbs take a config file plus key=value overrides unless they say otherwise.


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults are used where absent)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


def _cmd_train(args: argparse.Namespace) -> int:
    from fedrun.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from fedrun import simulator

    run_dir = simulator.run(cfg)
    _say(f"done: {run_dir}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from fedrun.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from fedrun import simulator
    from fedrun.finetune import FinetuneTask

    run_dir = simulator.run(cfg, FinetuneTask(cfg))
    _say(f"done: {run_dir}")
    return 0


COMMANDS = {
    "train": ("federated DDPM pre-training (FedAvg over torchrun ranks)", _config_arguments, _cmd_train),
    "finetune": ("federated LoRA fine-tuning of a Stable Diffusion-style model", _config_arguments,
                 _cmd_finetune),
}
PLANNED = ("central", "finetune", "sample", "evaluate", "compare")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrun", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(verbs.add_parser(verb, help=help_text, description=help_text))
    for verb in PLANNED:
        if verb not in COMMANDS:
            verbs.add_parser(verb, help="(not implemented yet)").add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _say(message: str) -> None:
    from fedrun import dist

    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb in COMMANDS:
            return COMMANDS[args.verb][2](args)
        _say(f"fedrun {args.verb}: not implemented yet in this version")
        return 2
    except FedrunError as exc:
        _say(f"fedrun {args.verb}: error: {exc}")
        return 2
    finally:
        from fedrun import dist

        dist.destroy()


if __name__ == "__main__":
    # torch/diffusers print warnings through several loggers; keep the first screen readable.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
