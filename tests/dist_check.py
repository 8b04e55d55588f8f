"""Run under torchrun by tests/integration/test_multiprocess.py (one launch does several checks: start-up
costs ~15-30 s per launch).

    torchrun --nproc_per_node=N tests/dist_check.py OUT_DIR [train overrides...]

1. Reduction: every rank adds the deterministic updates of the clients dealt to it into a
   RoundBuffer; after the one all_reduce the mean must equal the one-process weighted mean.
2. Training: ``fedrun train`` (``simulator.run``) with the given overrides, in the same process
   group; a failure raises (and fails the job), so reaching the report means exit code 0.
3. The same training with a toy piece in every seam (toy_algorithms.STATEFUL_OVERRIDES) into
   OUTPUT_DIR_stateful, and fedrun's own stateful algorithms (toy_algorithms.ALGORITHM_VARIANTS)
   into OUTPUT_DIR_<name>. Run without torchrun, this is the world-size-1 reference.
Rank 0 writes OUT_DIR/check_wsN.json with the results.
"""

import json
import sys
from pathlib import Path

import torch

from fedrun.engine import dist
from fedrun.engine import simulator
from fedrun.fl.aggregation.buffer import RoundBuffer, weighted_mean
from fedrun.engine.cohort import assign_to_ranks
from fedrun.config import load_config
from toy_algorithms import ALGORITHM_VARIANTS, STATEFUL_OVERRIDES


def fake_client(client: int, num_params: int):
    generator = torch.Generator().manual_seed(1000 + client)
    return torch.randn(num_params, generator=generator), float(3 + 5 * client), 0.1 * client


def reduction_check(num_params: int = 10_001, cohort=(0, 2, 3, 5, 6, 9)) -> dict:
    rank, world = dist.rank(), dist.world_size()
    global_w = torch.linspace(-1, 1, num_params)
    buffer = RoundBuffer(num_params, cohort, world)
    for client in assign_to_ranks(list(cohort), world)[rank]:
        local, weight, loss = fake_client(client, num_params)
        buffer.add_client(client, global_w + local, global_w, weight, loss, samples=16)
    buffer.set_compute_time(rank, float(rank + 1))
    dist.all_reduce_sum(buffer.buffer)
    result = buffer.decode()
    updates, weights, losses = zip(*(fake_client(c, num_params) for c in cohort))
    expected = weighted_mean(list(updates), list(weights))
    return {
        "max_abs_diff": float((result.mean_update - expected).abs().max()),
        "total_weight": result.total_weight,
        "expected_total_weight": float(sum(weights)),
        "losses_match": all(abs(result.client_loss[c] - l) < 1e-6 for c, l in zip(cohort, losses)),
        "samples": result.client_samples,
        "rank_compute_s": result.rank_compute_s,
    }


def main() -> int:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    dist.init("cpu", timeout_s=300, threads=1)
    report = {"world_size": dist.world_size(), "reduction": reduction_check()}
    cfg = load_config(None, overrides)
    simulator.run(cfg)
    # 3. The same job with a toy piece in every seam: a stateful client algorithm with a buffer
    #    segment (client state store), seeded update and server transforms, a custom strategy.
    simulator.run(load_config(None, overrides + STATEFUL_OVERRIDES
                              + [f"output_dir={cfg.output_dir}_stateful"]))
    # 4. fedrun's stateful algorithms (SCAFFOLD + FedAdam + stateful SGD, FedProx + FedYogi +
    #    stateful AdamW) and the codecs with error feedback into OUTPUT_DIR_<name>.
    for name, extra in ALGORITHM_VARIANTS.items():
        simulator.run(load_config(None, overrides + extra + [f"output_dir={cfg.output_dir}_{name}"]))
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"check_ws{dist.world_size()}.json").write_text(json.dumps(report))
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
