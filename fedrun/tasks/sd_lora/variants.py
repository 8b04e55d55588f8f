"""Federated LoRA variants (``finetune.lora_aggregation``): what a client starts from, what it
sends, what the server makes of the round, and which model is sampled and exported.

The round loop is the engine's for every variant (one flat buffer, ONE all-reduce); a variant
acts through the task's client and server hooks (``Task.start_client``, ``finish_client``,
``segments``, ``server_step``, ``client_bytes``). The federated vector is the LoRA state at the
global rank R = max(client ranks); a client of rank r < R uses its first r rank components
(rows of A, columns of B) and holds zeros in the others, which then stay zero in training (their
gradients vanish while both factors are zero). Every client uses the global scale alpha / R, so a
truncation is literally the leading components of the same delta W.

* ``fedavg`` / ``ffa``: the engine's averaging of the factors (``ffa``: A frozen, only B).
* ``fedsa`` (FedSA-LoRA, arXiv 2410.01463): A is averaged; each client's B is its own, kept in
  the client state store between its rounds (zero before its first, like LoRA's init) and never
  sent: B's coordinates of the update are zero, so the global B stays at its init (zero).
* ``hetlora`` (Cho et al. 2024): the client of rank r trains the rank-r truncation of the global
  LoRA; its factors, zero-padded to R, are averaged with the clients' weights (the update
  "padded - global" is what enters the buffer). Self-pruning is not implemented.
* ``flexlora`` (arXiv 2402.11505): the clients' products, weighted, are summed in a buffer
  segment; the server forms delta W = sum p_k B_k A_k per layer and keeps its rank-R truncated
  SVD as the global factors, so the client of rank r receives the rank-r truncated SVD.
* ``flora`` (arXiv 2409.05976): every round each client trains fresh factors of its rank (A
  drawn from (seed, round, client), B = 0); stacking [p_1 B_1 ... p_K B_K] [A_1; ...; A_K] equals
  sum p_k B_k A_k, which the buffer segment sums; the server merges it into the frozen base
  weights and the LoRA starts afresh.

The products segment is U-Net-projection-sized (sum d_out x d_in over the LoRA layers): that is
what the simulator reduces, not what a client sends (``client_bytes``: the factors).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fedrun.errors import ConfigError
from fedrun.fl.aggregation.buffer import BYTES_PER_FLOAT, Segment, client_weight
from fedrun.rng import derived_generator
from fedrun.tasks.base import ClientExtras

_RANK_STREAM = 0x4A4E  # (seed, client, tag): the draw of a client's rank from client_rank_choices
_FLORA_STREAM = 0xF10A  # (seed, round, client, tag): flora's fresh A of a client
PRODUCTS = "lora_products"  # the buffer segment of sum n_k B_k A_k


# ---------------------------------------------------------------- pure math

def check_variant_config(cfg) -> None:
    """Refuse settings a LoRA variant cannot honour (a ConfigError naming the key)."""
    ft, name = cfg.finetune, cfg.finetune.lora_aggregation
    if name in ("fedavg", "ffa"):
        return
    what = f"finetune.lora_aggregation={name}"
    if ft.mode != "lora":
        raise ConfigError(f"config key 'finetune.mode': {what} needs mode 'lora'")
    # A variant sets what the client starts from and what it sends; a proximal term, control
    # variates or optimizer moments of the whole vector would act on parts it replaces.
    if cfg.client.algorithm != "fedavg" or cfg.client.stateful_optimizer:
        raise ConfigError(f"config key 'client.algorithm': {what} runs the plain fedavg client "
                          "(client.algorithm=fedavg, client.stateful_optimizer=false)")
    # Its bytes are its own (parts, per-client ranks, stacked factors) and its clients do not
    # all send the same vector: a codec or a partial exchange on top is not implemented.
    for way in ("uplink", "downlink"):
        if getattr(cfg.aggregation, way).name != "fp32":
            raise ConfigError(f"config key 'aggregation.{way}.name': {what} sends fp32 factors; "
                              "codecs work with finetune.lora_aggregation=fedavg or ffa")
    if cfg.aggregation.shared:
        raise ConfigError(f"config key 'aggregation.shared': {what} decides itself what travels "
                          "(use it with finetune.lora_aggregation=fedavg or ffa)")
    resolve_client_ranks(ft, cfg.num_clients, cfg.seed)
    if name not in ("flexlora", "flora"):
        return
    # The server replaces the averaged factors by its own (SVD factors, or a fresh LoRA after
    # merging), so a server optimizer, an EMA of factors or DP noise on factors would be ignored
    # or meaningless; DP on the products segment is not implemented.
    for key, value, wanted in (("server.strategy", cfg.server.strategy, "fedavg"),
                               ("ema.enabled", cfg.ema.enabled, False),
                               ("privacy.enabled", cfg.privacy.enabled, False)):
        if value != wanted:
            raise ConfigError(f"config key '{key}': {what} forms the global LoRA on the server "
                              f"from sum p_k B_k A_k; set {key}={str(wanted).lower()}")
    if name == "flora" and ft.base_dtype != "float32":
        raise ConfigError(f"config key 'finetune.base_dtype': {what} merges each round into the "
                          "base weights, which needs float32")


def resolve_client_ranks(ft, num_clients: int, seed: int) -> List[int]:
    """Each client's LoRA rank: ``client_ranks``, a draw from ``client_rank_choices`` seeded by
    (seed, client), or ``lora_rank`` for all."""
    if ft.client_ranks:
        if len(ft.client_ranks) != num_clients:
            raise ConfigError(f"config key 'finetune.client_ranks': one rank per client: "
                              f"{num_clients} entries (num_clients), got {len(ft.client_ranks)}")
        return list(ft.client_ranks)
    if ft.client_rank_choices:
        choices = list(ft.client_rank_choices)
        return [choices[int(torch.randint(len(choices), (1,),
                                          generator=derived_generator(seed, client, _RANK_STREAM)))]
                for client in range(num_clients)]
    return [ft.lora_rank] * num_clients


def truncate_(a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    """Keep the first ``rank`` components of (A, B), zero the others, in place."""
    a[rank:].zero_()
    b[:, rank:].zero_()


def zero_pad_mean(factors: Sequence[Tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                  rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA's aggregation of one layer: each client's (A_k (r_k x d_in), B_k (d_out x r_k))
    zero-padded to ``rank``, then averaged with ``weights`` (reference for the tests; the round
    computes it through the buffer)."""
    total = float(sum(weights))
    a0, b0 = factors[0]
    a = torch.zeros(rank, a0.shape[1], dtype=torch.float64)
    b = torch.zeros(b0.shape[0], rank, dtype=torch.float64)
    for (a_k, b_k), w in zip(factors, weights):
        a[: a_k.shape[0]] += w / total * a_k.double()
        b[:, : b_k.shape[1]] += w / total * b_k.double()
    return a, b


def svd_factors(delta: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A (rank x d_in), B (d_out x rank)) with B A = the rank-``rank`` truncated SVD of
    ``delta``; the singular values are split evenly (B = U sqrt(S), A = sqrt(S) V^T) so both
    factors have the same scale for the clients' optimizer. Zero-filled past delta's rank."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root
    return a, b


def stack_lora(factors: Sequence[Tuple[torch.Tensor, torch.Tensor]],
               weights: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking of one layer: A = [A_1; ...; A_K], B = [p_1 B_1, ..., p_K B_K] with
    p_k = w_k / sum w, so B A = sum p_k B_k A_k exactly (rank sum r_k): what the downlink carries."""
    total = float(sum(weights))
    return (torch.cat([a for a, _ in factors], dim=0),
            torch.cat([b * (w / total) for (_, b), w in zip(factors, weights)], dim=1))


# ---------------------------------------------------------------- the variants

class LoraVariant:
    """``fedavg`` and ``ffa``: the engine's round as it is; the global LoRA is the model."""

    def __init__(self, task, run):
        from fedrun.tasks.sd_lora.lora import lora_layers

        self.task, self.cfg, self.ft = task, task.cfg, task.ft
        self.layers = lora_layers(run.model)
        self.ranks = resolve_client_ranks(self.ft, self.cfg.num_clients, self.cfg.seed)
        #: floats of one rank component over all layers: d_in + d_out per layer
        self.per_rank = sum(layer.a.shape[1] + layer.b.shape[0] for layer in self.layers)

    def start_client(self, run, client: int, global_round: int, state) -> None:
        del run, client, global_round, state

    def finish_client(self, run, client: int, weight: float) -> Optional[ClientExtras]:
        return None

    def segments(self, run) -> List[Segment]:
        return []

    def server_step(self, run, result) -> None:
        del run, result

    def client_bytes(self, run, client: int, result) -> Optional[Tuple[int, int]]:
        """(uplink, downlink) bytes of ``client`` in the reduced round ``result``; None: the
        engine's count (the federated vector and the client algorithm's segments)."""
        return None

    def uplink_bytes(self, run, client: int) -> int:
        """The LoRA values ``client`` sends per round (without a client algorithm's segments)."""
        return run.params.numel * BYTES_PER_FLOAT

    def model_weights(self, run, weights: torch.Tensor) -> torch.Tensor:
        """The federated vector of the model to sample and export, given the global (or EMA)
        ``weights``."""
        return weights

    def export_weights(self, run) -> torch.Tensor:
        return self.model_weights(run, run.ema.shadow)

    def base_model(self, run):
        """Context in which the replica's frozen base is the pretrained one (base.png)."""
        return contextlib.nullcontext()

    def rank_bytes(self, rank: int) -> int:
        return rank * self.per_rank * BYTES_PER_FLOAT


class FedSA(LoraVariant):
    """FedSA-LoRA: A shared and averaged, B per client. The model sampled and exported is the
    shared A with the mean of the B's the clients last stored, weighted like their updates (the
    consensus of the personal models; every client that trained counts, absent ones with their
    last B)."""

    def __init__(self, task, run):
        super().__init__(task, run)
        spans, offset = [], 0
        for name, shape in zip(run.params.names, run.params.shapes):
            if ".lora_B." in name:
                spans.append((offset, offset + shape.numel()))
            offset += shape.numel()
        self.b_spans = spans
        self.b_numel = sum(end - start for start, end in spans)

    def _b(self, vector: torch.Tensor) -> torch.Tensor:
        return torch.cat([vector[start:end] for start, end in self.b_spans])

    def _set_b(self, vector: torch.Tensor, b: torch.Tensor) -> None:
        offset = 0
        for start, end in self.b_spans:
            vector[start:end].copy_(b[offset: offset + end - start])
            offset += end - start

    def start_client(self, run, client: int, global_round: int, state) -> None:
        if state is not None:
            self._set_b(run.params.flat, state["lora_B"].to(run.device))

    def finish_client(self, run, client: int, weight: float) -> ClientExtras:
        """Keep the trained B with the client; B's part of the update becomes zero."""
        b = self._b(run.params.flat).detach().clone()
        self._set_b(run.params.flat, self._b(run.global_weights))
        return ClientExtras(segments={}, state={"lora_B": b})

    def uplink_bytes(self, run, client: int) -> int:
        return (run.params.numel - self.b_numel) * BYTES_PER_FLOAT

    def client_bytes(self, run, client: int, result) -> Tuple[int, int]:
        return self.uplink_bytes(run, client), self.uplink_bytes(run, client)  # A each way

    def model_weights(self, run, weights: torch.Tensor) -> torch.Tensor:
        from fedrun.engine.client_state import ClientStateStore

        store = ClientStateStore(Path(self.cfg.output_dir))
        total, mean = 0.0, torch.zeros(self.b_numel, dtype=torch.float64)
        for client in store.clients():
            state = store.load(client, self.cfg.rounds)  # its newest B
            weight = client_weight(len(run.client_indices[client]), self.cfg.server.weighting)
            mean += weight * state["lora_B"].double()
            total += weight
        out = weights.detach().clone()
        if total > 0:
            self._set_b(out, (mean / total).float().to(out.device))
        return out


class HetLoRA(LoraVariant):
    """HetLoRA: rank-r_k truncation down, zero-padded averaging up (the engine's weighted mean
    of the padded factors); the global max-rank LoRA is the model."""

    def start_client(self, run, client: int, global_round: int, state) -> None:
        for layer in self.layers:
            truncate_(layer.a, layer.b, self.ranks[client])

    def uplink_bytes(self, run, client: int) -> int:
        return self.rank_bytes(self.ranks[client])

    def client_bytes(self, run, client: int, result) -> Tuple[int, int]:
        return self.uplink_bytes(run, client), self.uplink_bytes(run, client)  # rank r_k each way


class _ProductsVariant(HetLoRA):
    """The clients' weighted products n_k B_k A_k summed in one buffer segment; the server
    reads delta W = sum p_k B_k A_k per layer from it."""

    def __init__(self, task, run):
        super().__init__(task, run)
        self.product_numel = sum(layer.b.shape[0] * layer.a.shape[1] for layer in self.layers)
        self._products: Optional[torch.Tensor] = None

    def segments(self, run) -> List[Segment]:
        # exact grid of magnitude ~1 (no reference): products of LoRA factors are far below 1
        return [Segment(PRODUCTS, self.product_numel, weighted=True)]

    @torch.no_grad()
    def finish_client(self, run, client: int, weight: float) -> ClientExtras:
        if self._products is None:
            self._products = torch.empty(self.product_numel, device=run.device)
        offset = 0
        for layer in self.layers:
            n = layer.b.shape[0] * layer.a.shape[1]
            torch.mm(layer.b, layer.a, out=self._products[offset: offset + n].view(layer.b.shape[0], -1))
            offset += n
        return ClientExtras(segments={PRODUCTS: self._products})

    def mean_products(self, result) -> List[torch.Tensor]:
        """delta W = sum n_k B_k A_k / sum n_k of each layer (d_out x d_in)."""
        flat = result.segments[PRODUCTS] / result.total_weight
        out, offset = [], 0
        for layer in self.layers:
            n = layer.b.shape[0] * layer.a.shape[1]
            out.append(flat[offset: offset + n].view(layer.b.shape[0], layer.a.shape[1]))
            offset += n
        return out


class FlexLoRA(_ProductsVariant):
    """FlexLoRA: the global factors are the rank-R truncated SVD of delta W; the client of rank r
    gets its first r components, i.e. the rank-r truncated SVD. That rank-R LoRA is the model
    (the full delta W has rank up to sum r_k and is not kept)."""

    @torch.no_grad()
    def server_step(self, run, result) -> None:
        for layer, delta in zip(self.layers, self.mean_products(result)):
            a, b = svd_factors(delta, layer.a.shape[0])
            layer.a.copy_(a)
            layer.b.copy_(b)
        run.global_weights.copy_(run.params.flat)


class FLoRA(_ProductsVariant):
    """FLoRA: fresh modules every round, stacked on the server, the round's delta W merged into
    the frozen base (identically on every rank). The model is the merged base (the LoRA is zero
    between rounds); the export is the rank-R truncated SVD of the accumulated delta W (the
    exact stacked LoRA would have rank rounds x sum r_k)."""

    def __init__(self, task, run):
        super().__init__(task, run)
        if run.resume_from is not None:
            raise ConfigError("config key 'resume': a 'flora' run (finetune.lora_aggregation) "
                              "merges each round into the frozen base, which checkpoints do not "
                              "hold: it cannot be resumed; start it again (overwrite=true)")
        self.pretrained = [layer.base.clone() for layer in self.layers]
        self.merged = [torch.zeros_like(layer.base) for layer in self.layers]  # sum of delta W

    @torch.no_grad()
    def start_client(self, run, client: int, global_round: int, state) -> None:
        """Fresh factors of the client's rank: A uniform in +-1/sqrt(d_in) (peft's Kaiming init),
        drawn from (seed, round, client); B = 0."""
        generator = derived_generator(self.cfg.seed, global_round, client, _FLORA_STREAM)
        rank = self.ranks[client]
        for layer in self.layers:
            bound = 1.0 / math.sqrt(layer.a.shape[1])
            fresh = torch.rand(rank, layer.a.shape[1], generator=generator) * (2 * bound) - bound
            layer.a.zero_()
            layer.a[:rank].copy_(fresh)
            layer.b.zero_()

    @torch.no_grad()
    def server_step(self, run, result) -> None:
        for merged, delta in zip(self.merged, self.mean_products(result)):
            merged.add_(delta)
        self._merge()
        run.global_weights.copy_(self.task.initial_weights)  # the LoRA restarts from zero

    def _merge(self) -> None:
        for layer, pretrained, merged in zip(self.layers, self.pretrained, self.merged):
            torch.add(pretrained, merged, alpha=layer.scale, out=layer.base)

    @contextlib.contextmanager
    def base_model(self, run):
        for layer, pretrained in zip(self.layers, self.pretrained):
            layer.base.copy_(pretrained)
        try:
            yield
        finally:
            self._merge()

    def client_bytes(self, run, client: int, result) -> Tuple[int, int]:
        """Up: the client's factors; down: the round's stacked modules (rank: the sum of the
        accepted clients' ranks), which every client of the round merges."""
        stacked = sum(self.ranks[c] for c, w in result.client_weight.items() if w > 0)
        return self.uplink_bytes(run, client), self.rank_bytes(stacked)

    @torch.no_grad()
    def export_weights(self, run) -> torch.Tensor:
        """The rank-R truncated SVD of the accumulated delta W: what was merged, plus what the
        LoRA holds (zero after a federated round; the trained LoRA in ``fedrun central``)."""
        run.params.load_(run.ema.shadow)
        for layer, merged in zip(self.layers, self.merged):
            a, b = svd_factors(merged + layer.b @ layer.a, layer.a.shape[0])
            layer.a.copy_(a)
            layer.b.copy_(b)
        weights = run.params.flat.detach().clone()
        run.params.load_(run.global_weights)
        return weights


VARIANTS: Dict[str, type] = {"fedavg": LoraVariant, "ffa": LoraVariant, "fedsa": FedSA,
                             "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA}
