"""Partial exchange (aggregation.shared): which coordinates travel, usplit's pairing and means."""

import pytest
import torch

from fedrun.config import load_config
from fedrun.engine.flat import FlatParameters
from fedrun.errors import ConfigError
from fedrun.fl.aggregation.partial import Exchange, build_exchange
from fedrun.tasks.ddpm.model import build_unet

from conftest import tiny


def _exchange(*overrides):
    cfg = load_config(None, tiny("/tmp/unused", *overrides))
    params = FlatParameters(build_unet(cfg.model, 8, 1, cfg.seed))
    return build_exchange(cfg, params, params.flat.detach().clone()), params


def test_udec_shares_the_decoder_and_keeps_the_rest():
    exchange, params = _exchange("aggregation.shared=udec")
    shared = set(exchange.shared.tolist())
    offset = 0
    for name, shape in zip(params.names, params.shapes):
        coords = set(range(offset, offset + shape.numel()))
        decoder = name.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))
        assert (coords <= shared) if decoder else not (coords & shared), name
        offset += shape.numel()
    assert exchange.shared.numel() + exchange.personal.numel() == params.numel
    assert torch.equal(exchange.initial_personal, params.flat[exchange.personal])
    ulatdec, _ = _exchange("aggregation.shared=ulatdec")
    assert ulatdec.shared.numel() > exchange.shared.numel()


def test_usplit_pairs_clients_and_covers_every_part():
    exchange, params = _exchange("aggregation.shared=usplit")
    assert sum(g.numel() for g in exchange.groups.values()) == params.numel
    for clients in ([3, 9], [0, 1, 2, 3, 4], list(range(8))):
        for round_ in range(20):
            parts = exchange.assignment(clients, 0, round_)
            assert sorted(parts) == sorted(clients)
            sent = [p for ps in parts.values() for p in ps]
            assert sorted(set(sent)) == ["decoder", "encoder", "middle"]
            assert sent.count("middle") == (len(clients) + 1) // 2  # one per pair, the odd one
            assert sent.count("encoder") + sent.count("decoder") == len(clients)
    assert exchange.assignment(list(range(8)), 0, 1) == exchange.assignment(list(range(8)), 0, 1)
    assert exchange.assignment(list(range(8)), 0, 1) != exchange.assignment(list(range(8)), 0, 2)


def test_usplit_rescale_gives_each_part_its_own_weighted_mean():
    exchange = Exchange(6, groups={"encoder": torch.tensor([0, 1]), "middle": torch.tensor([2, 3]),
                                   "decoder": torch.tensor([4, 5])})
    # client a (weight 1) sent encoder+middle with update 1; client b (weight 3) decoder, update 2
    update_sum = torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0, 6.0])
    exchange.rescale_(update_sum, 4.0, {"encoder": 1.0, "middle": 1.0, "decoder": 3.0})
    assert torch.allclose(update_sum / 4.0, torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0]))
    nobody = torch.ones(6)
    exchange.rescale_(nobody, 4.0, {"encoder": 4.0})
    assert nobody.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("overrides, message", [
    (["aggregation.shared=[nothing.*]"], "pattern 'nothing.*' matches no trainable parameter"),
    (["aggregation.shared=[*lora_A*]"], "quote a value holding"),
    (["aggregation.shared=[usplit,udec]"], "'usplit' goes alone"),
    (["aggregation.shared=usplit", "privacy.enabled=true", "privacy.noise_multiplier=1.0"],
     "data-dependent denominator"),
    (["aggregation.shared=udec", "aggregation.personal_client=99"], "personal_client': must be a client"),
])
def test_bad_partial_exchange_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace("*", r"\*")):
        _exchange(*overrides)
