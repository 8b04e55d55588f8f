"""The codecs of aggregation.uplink / aggregation.downlink: what travels, its size, its bias."""

import math

import pytest
import torch

from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.fl.aggregation.codecs import Channel, _pack, _unpack
from fedrun.registry import CODECS

PARAMS = {"fp32": {}, "bf16": {}, "fp16": {}, "qsgd": {"bits": 3, "block": 64},
          "topk": {"fraction": 0.1}, "randk": {"fraction": 0.1}}


def _codec(name, error_feedback=False, **params):
    cls = CODECS.get(name)
    kwargs = {**PARAMS[name], **params}
    return cls(CODECS.params_of(name)(**kwargs) if kwargs else None, error_feedback)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("numel", [1, 7, 64, 1000, 4099])
def test_message_size_is_what_the_codec_declares(name, numel):
    codec = _codec(name)
    x = torch.randn(numel, generator=_gen(numel))
    message = codec.encode(x, _gen(1))
    assert message.nbytes == codec.message_bytes(numel)
    out = torch.full_like(x, float("nan"))
    codec.decode(message, out)
    assert torch.isfinite(out).all()


def test_four_bit_qsgd_is_under_015_of_fp32():
    numel = 100_000
    assert _codec("qsgd", bits=4, block=256).message_bytes(numel) <= 0.15 * 4 * numel
    assert _codec("qsgd", bits=4, block=256).message_bytes(numel) == numel // 2 + 4 * math.ceil(numel / 256)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (1003,), generator=_gen(bits)).to(torch.uint8)
    packed = _pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1003 * bits / 8)
    assert torch.equal(_unpack(packed, bits, 1003).long(), codes.long())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qsgd_is_unbiased_and_on_its_grid(bits):
    codec = _codec("qsgd", bits=bits, block=16)
    x = torch.randn(48, generator=_gen(3))
    draws = torch.stack([codec.decode(codec.encode(x, _gen(seed)), torch.empty_like(x))
                         for seed in range(4000)])
    scale = x.view(3, 16).abs().amax(dim=1).repeat_interleave(16)
    step = 2 * scale / (2 ** bits - 1)
    # each draw is one of the two grid levels around x
    assert ((draws - x).abs() <= step + 1e-6).all()
    levels = (draws + scale) / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    # the mean of 4000 draws is within 5 standard errors of x, coordinate by coordinate (plus
    # step / 200 for an x a hair above a level, whose rare round-ups 4000 draws may all miss)
    stderr = draws.std(dim=0) / math.sqrt(len(draws))
    assert ((draws.mean(dim=0) - x).abs() <= 5 * stderr + step / 200).all()
    # nearest rounding would be off by up to half a step: far outside that
    nearest = (levels.mean(dim=0).round() * step - scale)
    assert float((nearest - x).abs().max()) > 20 * float((draws.mean(dim=0) - x).abs().max())


def test_qsgd_randomness_comes_from_the_generator():
    codec = _codec("qsgd", bits=2)
    x = torch.randn(500, generator=_gen(0))
    a, b, c = (codec.encode(x, _gen(s)).tensors["codes"] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_topk_sends_the_largest_coordinates():
    x = torch.randn(1000, generator=_gen(0))
    codec = _codec("topk", fraction=0.05)
    out = codec.decode(codec.encode(x, None), torch.empty_like(x))
    kept = out != 0
    assert int(kept.sum()) == 50
    assert torch.equal(out[kept], x[kept])
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


def test_randk_is_unbiased_without_error_feedback_and_plain_with_it():
    x = torch.randn(200, generator=_gen(0))
    plain, scaled = _codec("randk", error_feedback=True, fraction=0.25), _codec("randk", fraction=0.25)
    a = plain.decode(plain.encode(x, _gen(5)), torch.empty_like(x))
    b = scaled.decode(scaled.encode(x, _gen(5)), torch.empty_like(x))
    kept = a != 0
    assert int(kept.sum()) == 50 and torch.equal(a[kept], x[kept])
    assert torch.allclose(b[kept], 4 * x[kept])
    # only the values travel: the receiver redraws the coordinates from the same seed
    assert set(plain.encode(x, _gen(5)).tensors) == {"values"}
    mean = torch.stack([scaled.decode(scaled.encode(x, _gen(s)), torch.empty_like(x))
                        for s in range(4000)]).mean(dim=0)
    assert float((mean - x).abs().max()) < 0.35 * float(x.abs().max())


def test_fp16_saturates_instead_of_sending_infinity():
    codec = _codec("fp16")
    x = torch.tensor([1e6, -1e6, 0.5])
    out = codec.decode(codec.encode(x, None), torch.empty_like(x))
    assert out.tolist() == [65504.0, -65504.0, 0.5]


def test_error_feedback_keeps_what_the_message_left_out():
    channel = Channel(_codec("topk", error_feedback=True, fraction=0.1), error_feedback=True)
    x = torch.randn(300, generator=_gen(0))
    sent, residual = x.clone(), None
    total_decoded = torch.zeros_like(x)
    for step in range(30):  # the same update again and again: the residual catches up
        message = x.clone()
        _, residual = channel.transmit_(message, None, residual)
        total_decoded += message
    # everything offered (30 x) = everything decoded + the residual, up to fp32 rounding
    assert torch.allclose(total_decoded + residual, 30 * sent, atol=1e-4)
    assert (total_decoded != 0).sum() > 30  # more than the top 30 coordinates were ever sent


def test_nonfinite_update_passes_unencoded_so_the_guard_rejects_it():
    channel = Channel(_codec("qsgd"), error_feedback=False)
    x = torch.ones(100)
    x[3] = float("nan")
    nbytes, _ = channel.transmit_(x, _gen(0))
    assert math.isnan(float(x[3])) and nbytes == channel.message_bytes(100)


def test_lossless_channel_leaves_the_tensor_alone():
    channel = Channel(_codec("fp32"))
    x = torch.randn(10)
    before = x.clone()
    assert channel.transmit_(x, None) == (40, None) and torch.equal(x, before)


@pytest.mark.parametrize("overrides, message", [
    (["aggregation.uplink.bits=4"], "not a parameter of codec 'fp32' (it belongs to 'qsgd')"),
    (["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=9"], "aggregation.uplink.bits': must be in 1..8"),
    (["aggregation.downlink.name=gzip"], "aggregation.downlink.name': unknown codec 'gzip'"),
    (["aggregation.uplink.error_feedback=true"], "codec 'fp32' is lossless"),
    (["aggregation.uplink.name=topk", "aggregation.uplink.fraction=0"], "fraction': must be in (0, 1]"),
    (["aggregation.uplink=3"], "must be a name or a section of keys"),
])
def test_bad_codec_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, overrides)


def test_codec_shorthand_and_parameters():
    cfg = load_config(None, ["aggregation.uplink=bf16", "aggregation.downlink.name=qsgd",
                             "aggregation.downlink.bits=2", "aggregation.downlink.error_feedback=true"])
    assert cfg.aggregation.uplink.name == "bf16"
    assert (cfg.aggregation.downlink.bits, cfg.aggregation.downlink.block) == (2, 256)
    assert cfg.aggregation.downlink.error_feedback
