"""Codecs: what an update looks like on the wire (``aggregation.uplink``, ``aggregation.downlink``).

A codec turns a flat fp32 vector into a ``Message`` -- the tensors that would travel (values,
indices, scales, packed codes) -- and back. The simulator really encodes and decodes: the decoded
vector is what enters the round's sum (uplink) or what the clients and the server both apply
(downlink), and a message's size is what the byte counters report. Registered in
``fedrun.registry.CODECS``; a codec's parameters sit beside its name
(``aggregation.uplink.name: qsgd`` + ``aggregation.uplink.bits: 4``).

A ``Channel`` is one direction: its codec plus, with ``error_feedback``, the residual of the
previous messages added to the next one (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): the
uplink's residual lives in each client's state, the downlink's on the server. Randomness (qsgd's
rounding, randk's coordinates) comes from a generator the caller derives from (seed, round,
client) or (seed, round), so the message does not depend on which rank encodes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from fedrun.registry import CODECS, require


@dataclass
class Message:
    """What travels (``tensors``, counted in ``nbytes``) and what both ends derive from shared
    randomness without sending it (``shared``: randk's coordinates, redrawn by the receiver from
    the same seed; kept here so the simulator does not draw them twice)."""

    tensors: Dict[str, torch.Tensor]
    shared: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec:
    """Encodes a flat fp32 vector. ``lossless`` codecs are skipped by the channel (no copy).
    ``message_bytes(numel)`` is the size of every message for a vector of ``numel`` values: every
    rank knows it without communicating (the byte counters use it; a test checks it against
    ``encode``)."""

    lossless = False
    #: uses the generator handed to encode
    random = False

    def __init__(self, params: Any = None, error_feedback: bool = False):
        self.params = params
        self.error_feedback = error_feedback

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> Message:
        raise NotImplementedError

    def decode(self, message: Message, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def message_bytes(self, numel: int) -> int:
        raise NotImplementedError


@CODECS.register("fp32")
class Float32(Codec):
    """The update as it is: 4 bytes per value (the default)."""

    lossless = True

    def encode(self, x, generator):
        return Message({"values": x})

    def decode(self, message, out):
        values = message.tensors["values"]
        if values.data_ptr() != out.data_ptr():
            out.copy_(values)
        return out

    def message_bytes(self, numel):
        return 4 * numel


class _Cast(Codec):
    dtype: torch.dtype

    def encode(self, x, generator):
        return Message({"values": x.to(self.dtype)})

    def decode(self, message, out):
        return out.copy_(message.tensors["values"])

    def message_bytes(self, numel):
        return numel * torch.finfo(self.dtype).bits // 8


@CODECS.register("bf16")
class BFloat16(_Cast):
    """bfloat16, round to nearest even: 2 bytes per value, fp32's range, 8 bits of mantissa."""

    dtype = torch.bfloat16


@CODECS.register("fp16")
class Float16(_Cast):
    """float16, round to nearest even: 2 bytes per value, 11 bits of mantissa; values beyond
    +-65504 are saturated there (not sent as infinities)."""

    dtype = torch.float16

    def encode(self, x, generator):
        limit = torch.finfo(torch.float16).max
        return Message({"values": x.clamp(-limit, limit).to(torch.float16)})


@dataclass
class QsgdParams:
    bits: int = 4
    """Bits per value, 1-8: 2**bits levels evenly spaced over [-m, m], m the block's max |x|."""
    block: int = 256
    """Values sharing one fp32 scale m."""

    def __post_init__(self) -> None:
        require(1 <= self.bits <= 8, "bits", f"must be in 1..8, got {self.bits}")
        require(self.block >= 1, "block", f"must be >= 1, got {self.block}")


@CODECS.register("qsgd", params=QsgdParams)
class Qsgd(Codec):
    """Stochastic uniform quantization (QSGD's unbiased rounding, Alistarh et al. 2017, with a
    scale per block): each block of ``block`` values is sent as its max |x| (fp32) and one
    ``bits``-bit code per value, the index of a level of the 2**bits spanning [-m, m], rounded up
    with probability equal to the fraction of the step (so the decoded value's mean is x). The
    codes are bit-packed: ceil(n * bits / 8) bytes plus 4 per block."""

    random = True

    def _levels(self) -> int:
        return (1 << self.params.bits) - 1

    def encode(self, x, generator):
        n, block = x.numel(), self.params.block
        blocks = -(-n // block)
        padded = torch.zeros(blocks * block, dtype=torch.float32, device=x.device)
        padded[:n] = x
        padded = padded.view(blocks, block)
        scale = padded.abs().amax(dim=1)
        step = torch.where(scale > 0, 2 * scale / self._levels(), torch.ones_like(scale))
        position = padded.add_(scale[:, None]).div_(step[:, None])  # in [0, levels], in place
        codes = position.floor()
        fraction = position.sub_(codes)
        codes += torch.rand(fraction.shape, generator=generator, device=x.device).lt_(fraction)
        codes = codes.clamp_(0, self._levels()).to(torch.uint8).view(-1)[:n]
        return Message({"codes": _pack(codes, self.params.bits), "scale": scale})

    def decode(self, message, out):
        n, block = out.numel(), self.params.block
        scale = message.tensors["scale"]
        blocks = scale.numel()
        codes = torch.zeros(blocks * block, dtype=torch.float32, device=out.device)
        codes[:n] = _unpack(message.tensors["codes"], self.params.bits, n)
        step = 2 * scale / self._levels()
        values = torch.addcmul(-scale[:, None], codes.view(blocks, block), step[:, None])
        return out.copy_(values.view(-1)[:n])

    def message_bytes(self, numel):
        return -(-numel * self.params.bits // 8) + 4 * -(-numel // self.params.block)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits -> ceil(n * bits / 8) bytes, least significant bits first."""
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shifted in place
        per_byte = 8 // bits
        grouped = torch.cat([codes, codes.new_zeros(-codes.numel() % per_byte)]).view(-1, per_byte)
        packed = grouped[:, 0].clone()
        for j in range(1, per_byte):
            packed |= grouped[:, j] << (j * bits)
        return packed
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[:, None] >> shifts) & 1).view(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (stream.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``_pack``'s bytes (uint8)."""
    if bits == 8:
        return packed[:n]
    if 8 % bits == 0:
        mask = (1 << bits) - 1
        parts = [(packed >> (j * bits)) & mask if j else packed & mask for j in range(8 // bits)]
        return torch.stack(parts, dim=1).view(-1)[:n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).view(-1)[: n * bits].view(n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


@dataclass
class SparseParams:
    fraction: float = 0.1
    """Share of the coordinates sent: k = max(1, round(fraction * n))."""

    def __post_init__(self) -> None:
        require(0 < self.fraction <= 1, "fraction", f"must be in (0, 1], got {self.fraction}")


def _k(fraction: float, numel: int) -> int:
    return max(1, min(numel, int(round(fraction * numel))))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2 ** 31 else torch.int64


@CODECS.register("topk", params=SparseParams)
class TopK(Codec):
    """The k coordinates of largest |x| (Aji & Heafield 2017): k fp32 values and k indices
    (int32), 8 bytes per sent coordinate. Biased: pair it with ``error_feedback``."""

    def encode(self, x, generator):
        k = _k(self.params.fraction, x.numel())
        index = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return Message({"values": x[index], "indices": index.to(_index_dtype(x.numel()))})

    def decode(self, message, out):
        out.zero_()
        out[message.tensors["indices"].long()] = message.tensors["values"]
        return out

    def message_bytes(self, numel):
        k = _k(self.params.fraction, numel)
        return k * (4 + torch.iinfo(_index_dtype(numel)).bits // 8)


@CODECS.register("randk", params=SparseParams)
class RandK(Codec):
    """k coordinates drawn uniformly without replacement from the (seed, round, client) stream,
    which the receiver redraws: only the k fp32 values travel (4 bytes each). Without error
    feedback the values are scaled by n / k (unbiased: Stich et al. 2018's rand-k); with it they
    are sent as they are and the residual keeps the rest."""

    random = True

    def encode(self, x, generator):
        n = x.numel()
        k = _k(self.params.fraction, n)
        index = torch.randperm(n, generator=generator, device=x.device)[:k].sort().values
        values = x[index]
        if not self.error_feedback:
            values = values * (n / k)
        return Message({"values": values}, shared={"indices": index})

    def decode(self, message, out):
        out.zero_()
        out[message.shared["indices"]] = message.tensors["values"]
        return out

    def message_bytes(self, numel):
        return 4 * _k(self.params.fraction, numel)


class Channel:
    """One direction of the exchange: the codec and, with error feedback, its residual."""

    def __init__(self, codec: Codec, error_feedback: bool = False):
        self.codec = codec
        self.error_feedback = error_feedback
        self.residual: Optional[torch.Tensor] = None  # the sender's, when the server sends

    @property
    def lossless(self) -> bool:
        return self.codec.lossless and not self.error_feedback

    def transmit_(self, x: torch.Tensor, generator: Optional[torch.Generator],
                  residual: Optional[torch.Tensor] = None,
                  coords: Optional[torch.Tensor] = None) -> Tuple[int, Optional[torch.Tensor]]:
        """Replace ``x`` (in place) by what the receiver decodes. With error feedback, ``residual``
        (None: zero) is added first and the new residual -- what the message left out -- is
        returned. ``coords``: the coordinates of ``x`` that are sent (None: all); the others are
        zeroed, as they never reach the receiver, and the residual keeps the size of ``x``
        (updated in place on ``coords``: a partial exchange may send other coordinates next
        time). Returns (message bytes, new residual or None)."""
        if coords is None:
            return self._transmit(x, generator, residual)
        part = x[coords]
        nbytes, new = self._transmit(part, generator,
                                     residual[coords] if residual is not None else None)
        x.zero_()
        x[coords] = part
        if new is None:
            return nbytes, residual
        full = residual if residual is not None else torch.zeros_like(x)
        full[coords] = new
        return nbytes, full

    def _transmit(self, x: torch.Tensor, generator: Optional[torch.Generator],
                  residual: Optional[torch.Tensor]) -> Tuple[int, Optional[torch.Tensor]]:
        if self.lossless:
            return self.codec.message_bytes(x.numel()), None
        if not math.isfinite(float(x.sum())):  # sent as it is: the non-finite guard rejects it
            return self.codec.message_bytes(x.numel()), residual
        if self.error_feedback and residual is not None:
            x.add_(residual)
        message = self.codec.encode(x, generator)
        nbytes = message.nbytes
        expected = self.codec.message_bytes(x.numel())
        if nbytes != expected:  # the byte counters rely on it
            raise RuntimeError(f"codec '{self.codec.name}' sent {nbytes} bytes for "
                               f"{x.numel()} values, not the {expected} it declares")
        kept = x.clone() if self.error_feedback else None
        self.codec.decode(message, x)
        return nbytes, (kept.sub_(x) if kept is not None else None)

    def message_bytes(self, numel: int) -> int:
        return self.codec.message_bytes(numel)

    def transmit_server_(self, x: torch.Tensor, generator: Optional[torch.Generator],
                         coords: Optional[torch.Tensor] = None) -> int:
        """``transmit_`` with the residual kept here (the downlink's, on the server)."""
        nbytes, residual = self.transmit_(x, generator, self.residual, coords)
        if self.error_feedback:
            self.residual = residual
        return nbytes

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"residual": self.residual} if self.residual is not None else {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.residual = state.get("residual")


def build_channel(section: Any) -> Channel:
    """The channel of a config section ``aggregation.uplink`` / ``aggregation.downlink``."""
    codec_cls = CODECS.get(section.name)
    codec = codec_cls(CODECS.build_params(section.name, section), section.error_feedback)
    return Channel(codec, section.error_feedback)
