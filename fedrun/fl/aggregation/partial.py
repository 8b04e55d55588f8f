"""Partial exchange (``aggregation.shared``): which coordinates of the federated vector travel.

Two kinds, after FedDiffuse (de Goede, Cox, Decouchant 2024, arXiv 2406.12575):

* **Personal parts** (name patterns, or the presets ``udec`` and ``ulatdec``): the coordinates
  that match travel both ways and are averaged; the others never leave their client. Each
  client keeps its own in the client state store (``personal``), starting from the initial
  model's; the server's copy of them never changes. ``udec`` shares the U-Net's decoder
  (``up_blocks``, ``conv_norm_out``, ``conv_out``), ``ulatdec`` the decoder and the middle block
  (``mid_block``): the encoder side -- ``conv_in``, ``time_embedding``, ``down_blocks`` (and a
  ``class_embedding``) -- is each client's own. There is then no single global model: the model
  that is sampled, evaluated and exported is that of client ``aggregation.personal_client`` (the
  shared parts with its personal parts as it last trained them; the initial ones until it has
  trained), written over the server's copy of the personal coordinates after every round.
* **Split upload** (``usplit``): every client receives the whole model and trains all of it, but
  sends only a part. Each round the clients that train are paired at random (seeded by
  (seed, round)): one of a pair sends the encoder, the other the decoder, and the middle block
  (with any parameter of neither side) goes with one of them at random; an odd client out
  sends the middle block and, at random, the encoder or the decoder. Each part is averaged
  over the clients that sent it (their weights), so every part moves like FedAvg's.

FedDiffuse's own code (a U-Net with ``downs`` / ``mid`` / ``ups``) groups the time embedding
with the encoder, as here. Groups are matched on parameter names (``fnmatch``); a pattern or
preset that matches no parameter of the model is an error naming it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from fedrun.errors import ConfigError
from fedrun.rng import derived_generator

ENCODER = ("conv_in.*", "time_embedding.*", "down_blocks.*")
MIDDLE = ("mid_block.*",)
DECODER = ("up_blocks.*", "conv_norm_out.*", "conv_out.*")
PRESETS = {"udec": DECODER, "ulatdec": MIDDLE + DECODER}
SPLIT = "usplit"
_SPLIT_STREAM = 0x5917  # usplit's pairing: (seed, round, tag), the same on every rank


def _matching(names: Sequence[str], patterns: Sequence[str], key: str) -> List[int]:
    """Indices of the parameters matching any pattern; a pattern matching none is an error."""
    chosen = set()
    for pattern in patterns:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"config key '{key}': pattern '{pattern}' matches no trainable "
                              f"parameter of the model (e.g. '{names[0]}', '{names[-1]}')")
        chosen.update(hits)
    return sorted(chosen)


def _coordinates(params, indices: Sequence[int], device) -> torch.Tensor:
    """The flat-vector coordinates of the parameters ``indices``, as one index tensor."""
    starts, offset = [], 0
    for shape in params.shapes:
        starts.append(offset)
        offset += shape.numel()
    parts = [torch.arange(starts[i], starts[i] + params.shapes[i].numel()) for i in indices]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


@dataclass
class Exchange:
    """What of the federated vector travels. ``shared``: the coordinates every client sends and
    receives (None: all); ``personal``: the others, kept per client. ``groups``: usplit's
    encoder / middle / decoder coordinates."""

    numel: int
    shared: Optional[torch.Tensor] = None
    personal: Optional[torch.Tensor] = None
    groups: Dict[str, torch.Tensor] = field(default_factory=dict)
    personal_client: int = 0
    initial_personal: Optional[torch.Tensor] = None  # new clients' personal parts

    @property
    def split(self) -> bool:
        return bool(self.groups)

    # ------------------------------------------------------------ usplit
    def assignment(self, clients: Sequence[int], seed: int, global_round: int) -> Dict[int, List[str]]:
        """usplit: client -> the groups it sends this round (every rank alike)."""
        if not self.split:
            return {}
        generator = derived_generator(seed, global_round, _SPLIT_STREAM)
        order = [clients[i] for i in torch.randperm(len(clients), generator=generator).tolist()]
        coins = torch.randint(0, 2, (len(order),), generator=generator).tolist()
        out: Dict[int, List[str]] = {}
        for i in range(0, len(order) - 1, 2):
            first, second = order[i], order[i + 1]
            out[first], out[second] = ["encoder"], ["decoder"]
            out[first if coins[i] else second].append("middle")
        if len(order) % 2:
            out[order[-1]] = ["middle", "encoder" if coins[-1] else "decoder"]
        return out

    def sent(self, groups: Optional[List[str]]) -> Optional[torch.Tensor]:
        """The coordinates a client sends (None: all of them)."""
        if self.split:
            return torch.cat([self.groups[g] for g in ("encoder", "middle", "decoder") if g in groups])
        return self.shared

    def sent_numel(self, groups: Optional[List[str]] = None) -> int:
        sent = self.sent(groups)
        return self.numel if sent is None else sent.numel()

    def received_numel(self) -> int:
        return self.numel if self.shared is None else self.shared.numel()

    def rescale_(self, update_sum: torch.Tensor, total_weight: float,
                 reporters: Dict[str, float]) -> None:
        """usplit: each group's sum over the clients that sent it, rescaled so that dividing by
        the round's total weight gives the group's own weighted mean (0 where none sent it)."""
        for name, coords in self.groups.items():
            weight = reporters.get(name, 0.0)
            scale = total_weight / weight if weight > 0 else 0.0
            update_sum[coords] *= scale


def build_exchange(cfg, params, global_weights: torch.Tensor) -> Exchange:
    """The exchange of ``aggregation.shared`` for the model's trainable parameters."""
    agg = cfg.aggregation
    numel = params.numel
    if not agg.shared:
        return Exchange(numel)
    names = params.names
    device = global_weights.device
    if agg.shared == [SPLIT]:
        if cfg.privacy.enabled:
            raise ConfigError("config key 'aggregation.shared': 'usplit' averages each part over "
                              "the clients that sent it, a data-dependent denominator that "
                              "DP-FedAvg (privacy.enabled) does not allow")
        encoder = _matching(names, ENCODER, "aggregation.shared")
        decoder = _matching(names, DECODER, "aggregation.shared")
        middle = [i for i in range(len(names)) if i not in set(encoder) | set(decoder)]
        groups = {"encoder": encoder, "middle": middle, "decoder": decoder}
        if not middle:
            raise ConfigError("config key 'aggregation.shared': 'usplit' needs a middle block "
                              "('mid_block.*'), and this model has none")
        return Exchange(numel, groups={g: _coordinates(params, idx, device) for g, idx in groups.items()})
    if SPLIT in agg.shared:
        raise ConfigError("config key 'aggregation.shared': 'usplit' goes alone")
    patterns: List[str] = []
    for item in agg.shared:
        patterns.extend(PRESETS.get(item, (item,)))
    shared_idx = _matching(names, patterns, "aggregation.shared")
    personal_idx = [i for i in range(len(names)) if i not in set(shared_idx)]
    if not personal_idx:
        return Exchange(numel)  # everything matched: a full exchange
    if not 0 <= agg.personal_client < cfg.num_clients:
        raise ConfigError(f"config key 'aggregation.personal_client': must be a client, 0-"
                          f"{cfg.num_clients - 1}, got {agg.personal_client}")
    personal = _coordinates(params, personal_idx, device)
    return Exchange(numel, shared=_coordinates(params, shared_idx, device), personal=personal,
                    personal_client=agg.personal_client,
                    initial_personal=global_weights[personal].clone())
