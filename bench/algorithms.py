"""Client algorithms the benchmarks define (registered on import, once per process).

``bench_stateful``: FedAvg's client that also keeps ONE vector of P floats per client across
rounds -- its last update, the size of a SCAFFOLD control variate -- in the client state store.
Training is FedAvg's; what it measures is the store: memory per rank, bytes on disk, and the
time of loading and saving a state per sampled client.
"""

from __future__ import annotations

from fedrun.fl.clients import FedAvgClient
from fedrun.fl.local import ClientJob, ClientResult
from fedrun.registry import CLIENT_ALGORITHMS

STATEFUL = "bench_stateful"


class BenchStatefulClient(FedAvgClient):
    """FedAvg's local steps; the state is the client's last update (P floats, 4P bytes)."""

    stateful = True

    def train(self, job: ClientJob) -> ClientResult:
        result = super().train(job)
        if job.state is not None and job.state["last_update"].numel() != job.params.numel:
            raise ValueError("bench_stateful: a stored state of the wrong size")
        result.state = {"last_update": job.params.flat.detach() - job.global_weights}
        return result


if STATEFUL not in CLIENT_ALGORITHMS:  # `python -m bench.local` may import this module twice
    CLIENT_ALGORITHMS.register(STATEFUL)(BenchStatefulClient)
