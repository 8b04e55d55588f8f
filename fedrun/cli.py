"""fedrun: federated training and fine-tuning of diffusion models over torch.distributed.

Launch:
    python -m fedrun train --config configs/digits_fedavg.yaml [key=value ...]      # 1 process
    python -m fedrun central --config configs/digits_fedavg.yaml     # centralized baseline
    python -m fedrun sample --run runs/digits_fedavg n=1000          # samples of the EMA model
    python -m fedrun evaluate --run runs/digits_fedavg               # FID/KID + floor
    python -m fedrun compare --grid configs/grids/paper.yaml --jobs 2   # the paper's grid
    python -m fedrun audit --run runs/digits_fedavg                  # memorisation + MIA
    torchrun --nproc_per_node=4 -m fedrun train --config configs/digits_fedavg.yaml   # 4 ranks
    fedrun train --config configs/digits_fedavg.yaml rounds=50 num_clients=8 output_dir=runs/c8

Overrides are dotted config keys (``data.image_size=32``, ``logging.wandb=false``); see
``fedrun train --help`` and the README's configuration reference.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from typing import List, Optional

from fedrun.errors import DistributedError, FedrunError

# Each verb: help text, a function adding its own arguments, the function running it.
# Verbs take a config file plus key=value overrides unless they say otherwise.


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults are used where absent)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


@contextlib.contextmanager
def _start_up():
    """Import what a run needs with CPython's cyclic collector paused, then freeze it.

    torch and diffusers' model stack (with what diffusers pulls in when installed: transformers,
    peft, scipy) create about 700,000 long-lived objects, and every full collection while they
    load re-scans all of them: 1.1-1.7 s of each rank's start-up, for a few thousand objects
    freed. Frozen after the imports, later collections skip them; the collector resumes as usual
    for the run itself (docs/benchmarks/startup). The model stack is imported only once the
    config is valid, so a bad config is still reported at once."""
    gc.disable()
    try:
        yield
        with contextlib.suppress(ImportError):  # the run itself reports what is missing
            import torch  # noqa: F401
            from diffusers import UNet2DModel  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def _config_run(args: argparse.Namespace, run, task: Optional[str] = None) -> int:
    """Load the config of a config-driven verb (``task``: the task the verb trains, if it is
    bound to one); print it (--print-config) or ``run(cfg)`` it."""
    from fedrun.config import load_config, to_yaml

    if args.print_config:
        print(to_yaml(load_config(args.config, args.overrides, task=task)), end="")
        return 0
    with _start_up():
        cfg = load_config(args.config, args.overrides, task=task)
    _say(f"done: {run(cfg)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fedrun.engine import simulator

    return _config_run(args, simulator.run)


def _cmd_central(args: argparse.Namespace) -> int:
    from fedrun.engine.central import run_central

    # The config's task: with a fine-tuning config the baseline is centralized fine-tuning.
    return _config_run(args, run_central)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from fedrun.engine import simulator

    return _config_run(args, simulator.run, task="sd_lora")


# Short keys of `sample` / `evaluate` (any dotted config key is accepted too).
_RUN_KEYS = {"n": "eval.num_samples", "scheduler": "eval.scheduler", "steps": "eval.steps",
             "seed": "eval.seed", "feature": "eval.feature", "inception_weights": "eval.inception_weights"}


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run directory (output_dir of a run); under torchrun use --run-dir "
                             "(torchrun reads --run as its own --run-path)")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="n=, scheduler=ddim|ddpm, steps=, seed=, checkpoint=final|latest|ROUND|PATH, "
                             "out= (sample), samples= (evaluate: a samples.npz), feature=digits|inception, "
                             "inception_weights=, or any dotted config key")


def _run_settings(args: argparse.Namespace, special: tuple) -> tuple:
    from fedrun.errors import ConfigError

    overrides, chosen = [], {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"'{item}' is not of the form key=value")
        if key in special:
            chosen[key] = value
        else:
            overrides.append(f"{_RUN_KEYS.get(key, key)}={value}")
    # The run's own logging/threads settings are irrelevant here; keep the output quiet.
    return overrides, chosen


def _cmd_sample(args: argparse.Namespace) -> int:
    from fedrun.eval.sampling import open_run, sample_run

    overrides, chosen = _run_settings(args, ("checkpoint", "out"))
    if not any(o.startswith("eval.num_samples=") for o in overrides):
        overrides.append("eval.num_samples=64")
    with _start_up():
        cfg = open_run(args.run, overrides)
    sample_run(args.run, cfg, chosen.get("checkpoint"), chosen.get("out"), say=_say)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedrun.eval.sampling import evaluate_run, open_run

    overrides, chosen = _run_settings(args, ("checkpoint", "samples"))
    with _start_up():
        cfg = open_run(args.run, overrides)
    evaluate_run(args.run, cfg, chosen.get("checkpoint"), chosen.get("samples"), say=_say)
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", default="configs/grids/paper.yaml",
                        help="grid YAML (default: the paper's grid, configs/grids/paper.yaml)")
    parser.add_argument("--quick", action="store_true", help="the grid's tiny 'quick' variant")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (1: one after the other, in this process)")
    parser.add_argument("--backend", choices=["inline", "processes", "slurm"],
                        help="where the runs run: in this process, as separate processes, or as "
                             "Slurm job arrays of launch/slurm/sweep_array.sbatch (default: inline "
                             "for --jobs 1, processes otherwise)")
    parser.add_argument("--collect", action="store_true", help="only collect finished runs, train nothing")
    parser.add_argument("--out", help="folder of the runs (default: the grid's output_dir)")
    parser.add_argument("--report", help="report folder (default: <output_dir>/report)")
    parser.add_argument("--records", metavar="DIR",
                        help="keep every settled run's records (metrics, runner record; not its "
                             "weights) in DIR and restore from it the runs missing here: commit DIR "
                             "to carry a study to another machine, or to let --collect make its "
                             "report again")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedrun.experiments.compare import compare

    command = "python -m fedrun compare " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else [])
    report = compare(args.grid, args.quick, max(1, args.jobs), args.collect, args.report,
                     args.overrides, command=command.strip(), say=_say, output_dir=args.out,
                     backend=args.backend, records_dir=args.records)
    _say(f"report: {report.readme}" + (f" ({len(report.failures)} runs without results, marked in it)"
                                      if report.failures else ""))
    return 1 if report.failures else 0


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    from fedrun.eval.audit import AuditOptions

    defaults = AuditOptions()
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run directory (output_dir of a run); under torchrun use --run-dir "
                             "(torchrun reads --run as its own --run-path)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help=f"generated samples to compare with the data (default {defaults.num_samples})")
    parser.add_argument("--heldout", help="fine-tuning runs: folder of held-out images of the "
                                          "subject's class (the non-members)")
    parser.add_argument("--samples", help="use this samples.npz (from `fedrun sample`) instead of sampling")
    parser.add_argument("--thresholds", type=float, nargs="+", default=defaults.thresholds,
                        help="report the fraction of distance ratios below these")
    parser.add_argument("--noise-draws", type=int, default=defaults.noise_draws,
                        help="fixed noise draws per timestep of the membership-inference loss")
    parser.add_argument("--max-members", type=int, default=defaults.max_members,
                        help="at most this many training images in the membership-inference attack")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedrun.eval.audit import AuditOptions, audit_run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = AuditOptions(num_samples=args.num_samples, thresholds=list(args.thresholds),
                           noise_draws=args.noise_draws, max_members=args.max_members,
                           seed=args.seed, heldout=args.heldout, samples=args.samples)
    audit_run(args.run, options, say=_say)
    return 0


COMMANDS = {
    "train": ("federated training of the config's task (task.name; default: DDPM pre-training) "
              "over torchrun ranks", _config_arguments, _cmd_train),
    "central": ("centralized DDP baseline on the union of the clients' data, same budget",
                _config_arguments, _cmd_central),
    "sample": ("samples of a run's EMA model (final/ or a checkpoint) with diffusers schedulers",
               _run_arguments, _cmd_sample),
    "evaluate": ("FID/KID of a run's samples, with the real-vs-real floor", _run_arguments, _cmd_evaluate),
    "compare": ("run or collect a grid of runs and write the comparison report", _compare_arguments,
                _cmd_compare),
    "finetune": ("federated LoRA fine-tuning of a Stable Diffusion-style model (task sd_lora)",
                 _config_arguments, _cmd_finetune),
    "audit": ("what a run's model reveals about its clients' images: memorisation (nearest "
              "training vs held-out image of >= 1,000 samples) and loss-based membership inference",
              _audit_arguments, _cmd_audit),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrun", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(verbs.add_parser(verb, help=help_text, description=help_text))
    return parser


def _say(message: str, every_rank: bool = False) -> None:
    from fedrun.engine import dist

    if every_rank and dist.world_size() > 1:
        print(f"[rank {dist.rank()}] {message}", file=sys.stderr, flush=True)
    elif dist.is_main():
        print(message, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.verb][2](args)
    except FedrunError as exc:
        # A failed collective is seen differently by each rank (the hung one says nothing).
        _say(f"fedrun {args.verb}: error: {exc}", every_rank=isinstance(exc, DistributedError))
        return 2


if __name__ == "__main__":
    # torch/diffusers print warnings through several loggers; keep the first screen readable.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
