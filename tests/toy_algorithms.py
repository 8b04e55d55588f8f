"""Toy pieces for each seam, defined outside fedrun and registered the way a user's would be.

Imported by tests/integration/test_seams.py (in-process runs) and tests/dist_check.py (torchrun runs), so
that the multi-process world-size test covers every seam with randomness and per-client state.
"""

from dataclasses import dataclass

import torch

from fedrun.fl.aggregation.buffer import Segment
from fedrun.fl.aggregation.transforms import ServerTransform, UpdateTransform
from fedrun.fl.clients import ClientAlgorithm
from fedrun.fl.local import train_client
from fedrun.fl.strategies import ServerStrategy
from fedrun.registry import (CLIENT_ALGORITHMS, SERVER_TRANSFORMS, STRATEGIES, UPDATE_TRANSFORMS,
                             require)

STATEFUL_OVERRIDES = ["client.algorithm=toy_visits",
                      "aggregation.update_transforms=[nonfinite_guard,toy_jitter]",
                      "aggregation.server_transforms=[toy_server_noise]",
                      "server.strategy=toy_half_step"]

# fedrun's own stateful algorithms, run by tests/dist_check.py at every world size as well:
# name -> overrides (output_dir suffix _name).
ALGORITHM_VARIANTS = {
    "scaffold": ["client.algorithm=scaffold", "server.strategy=fedadam", "optim.name=sgd",
                 "optim.momentum=0", "optim.grad_clip=null", "optim.lr=0.05"],
    "fedprox": ["client.algorithm=fedprox", "client.prox_mu=0.1", "server.strategy=fedyogi",
                "client.stateful_optimizer=true"],
    # codecs with their randomness and error feedback: residuals in the client state store and
    # on the server (checkpoint group 'downlink')
    "qsgd_randk": ["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=3",
                   "aggregation.uplink.error_feedback=true", "aggregation.downlink.name=randk",
                   "aggregation.downlink.fraction=0.5", "aggregation.downlink.error_feedback=true",
                   "server.strategy=fedavgm"],
    # partial exchange: personal encoders (udec) and split uploads (usplit)
    "udec": ["aggregation.shared=udec", "aggregation.personal_client=1"],
    "usplit": ["aggregation.shared=usplit", "server.strategy=fedavgm",
               "aggregation.uplink.name=qsgd", "aggregation.uplink.error_feedback=true"],
    "topk_bf16": ["aggregation.uplink.name=topk", "aggregation.uplink.fraction=0.2",
                  "aggregation.uplink.error_feedback=true", "aggregation.downlink.name=bf16",
                  "client.algorithm=fedprox", "client.prox_mu=0.1"],
}


@STRATEGIES.register("toy_half_step")
class HalfStep(ServerStrategy):
    """w <- w + 0.5 * mean update, and it counts its steps (server state to checkpoint)."""

    def __init__(self, lr=None, params=None):
        super().__init__(lr, params)
        self.steps = torch.zeros(1)

    def step(self, weights, update_sum, total_weight=1.0):
        weights.add_(update_sum, alpha=0.5 / total_weight)
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"].clone()


@CLIENT_ALGORITHMS.register("toy_visits")
class Visits(ClientAlgorithm):
    """FedAvg's local training, plus per-client state (how often the client trained, and its
    last update) and a one-float segment (the visit counts, summed over the round's clients)
    whose running total is the algorithm's server-side state."""

    stateful = True

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        self.total_visits = torch.zeros(1)

    def segments(self, params):
        return [Segment("visits", 1)]

    def train(self, job):
        visits = job.state["visits"] + 1 if job.state is not None else torch.ones(1)
        result = train_client(job.model, job.params.params, job.loss, job.batches, job.generator,
                              job.optim, job.device, job.precision)
        result.state = {"visits": visits, "last_update": job.params.flat - job.global_weights}
        result.segments = {"visits": visits}
        return result

    def server_update(self, result):
        self.total_visits += result.segments["visits"].cpu()

    def state_dict(self):
        return {"total_visits": self.total_visits}

    def load_state_dict(self, state):
        self.total_visits = state["total_visits"].clone()


@UPDATE_TRANSFORMS.register("toy_jitter")
class Jitter(UpdateTransform):
    """Adds tiny noise from the update's own (seed, round, client) stream; its amplitude is its
    own parameter (``aggregation.toy_jitter.scale``)."""

    @dataclass
    class Params:
        scale: float = 1e-5
        """Standard deviation of the noise added to every coordinate."""

        def __post_init__(self):
            require(self.scale >= 0, "scale", f"must be >= 0, got {self.scale}")

    def __call__(self, delta, info):
        noise = torch.randn(delta.shape, generator=info.generator()).to(delta.device)
        delta.add_(noise, alpha=self.params.scale)
        return None


@UPDATE_TRANSFORMS.register("toy_reject_odd")
class RejectOdd(UpdateTransform):
    def __call__(self, delta, info):
        return "odd client" if info.client % 2 else None


@SERVER_TRANSFORMS.register("toy_server_noise")
class ServerNoise(ServerTransform):
    """Adds noise from the round's (seed, round) stream to the reduced sum: the same on every
    rank (no broadcast), like privacy noise will be."""

    def __call__(self, update_sum, info):
        noise = torch.randn(update_sum.shape, generator=info.generator()).to(update_sum.device)
        update_sum.add_(noise, alpha=1e-4 * info.total_weight)
        return {"toy_noise_norm": float(noise.norm())}
