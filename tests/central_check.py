"""Run under torchrun by tests/integration/test_evaluation.py (one launch, several checks: start-up is slow).

    torchrun --nproc_per_node=N tests/central_check.py RUN_DIR SAMPLES_DIR [central overrides...]

1. ``fedrun central`` (DDP over the N ranks) with the given overrides into RUN_DIR.
2. ``fedrun sample`` of that run into SAMPLES_DIR, the ranks sharing the chunks.
"""

import sys
from pathlib import Path

from fedrun.engine import dist
from fedrun.engine.central import run_central
from fedrun.config import load_config
from fedrun.eval.sampling import open_run, sample_run


def main() -> int:
    run_dir, samples_dir, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    dist.init("cpu", timeout_s=300, threads=1)  # one process group for both jobs (they keep it)
    run_central(load_config(None, overrides + [f"output_dir={run_dir}"]))
    cfg = open_run(run_dir, ["eval.num_samples=300", "eval.steps=2", "threads=1"])
    sample_run(run_dir, cfg, checkpoint="latest", out=samples_dir)
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
