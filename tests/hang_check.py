"""Run under torchrun by tests/integration/test_faults.py: ``fedrun train`` in which rank 1 hangs in round 2.

    torchrun --nproc_per_node=2 tests/hang_check.py [train overrides...]

Rank 1 sleeps instead of training its clients in round 2 (a stuck data loader, a wedged GPU), so
rank 0 waits in the round's all-reduce until the process-group timeout (``dist_timeout_s``)
expires. The test checks that the job then fails with an error that names the round, reported as
``fedrun train`` reports it: ``[rank R] fedrun train: error: ...`` on stderr, exit code 2.
"""

import sys
import time

from fedrun.engine import dist
from fedrun.engine import simulator
from fedrun.config import load_config
from fedrun.errors import FedrunError

HUNG_RANK, HUNG_ROUND = 1, 2  # round counted from 1, as in metrics.jsonl
_train_local = simulator.train_local


def train_local_or_hang(fed, cohort, mine, global_round):
    if fed.run.rank == HUNG_RANK and global_round + 1 == HUNG_ROUND:
        time.sleep(3600)  # torchrun ends this process once rank 0 has failed
    return _train_local(fed, cohort, mine, global_round)


def main() -> int:
    simulator.train_local = train_local_or_hang
    try:
        simulator.run(load_config(None, sys.argv[1:]))
        return 0
    except FedrunError as exc:
        print(f"[rank {dist.rank()}] fedrun train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
