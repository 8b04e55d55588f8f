"""Run under torchrun by tests/test_faults.py: ``fedrun train`` in which rank 1 hangs in round 2.

    torchrun --nproc_per_node=2 tests/hang_check.py [train overrides...]

Rank 1 sleeps instead of training its clients in round 2 (a stuck data loader, a wedged GPU), so
rank 0 waits in the round's all-reduce until the process-group timeout (``dist_timeout_s``)
expires. The test checks that the job then fails with an error that names the round.
"""

import sys
import time

from fedrun import simulator
from fedrun.cli import main as fedrun_main

HUNG_RANK, HUNG_ROUND = 1, 2  # round counted from 1, as in metrics.jsonl
_train_local = simulator.train_local


def train_local_or_hang(fed, cohort, mine, global_round):
    if fed.rank == HUNG_RANK and global_round + 1 == HUNG_ROUND:
        time.sleep(3600)  # torchrun ends this process once rank 0 has failed
    return _train_local(fed, cohort, mine, global_round)


if __name__ == "__main__":
    simulator.train_local = train_local_or_hang
    sys.exit(fedrun_main(["train", *sys.argv[1:]]))
