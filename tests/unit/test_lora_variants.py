"""The LoRA variants' pure math and config rules (``fedrun/tasks/sd_lora/variants.py``):
hand-computed values, no model."""

import pytest
import torch

from fedrun.errors import ConfigError
from fedrun.tasks.sd_lora.config import FinetuneConfig
from fedrun.tasks.sd_lora.variants import (resolve_client_ranks, stack_lora, svd_factors, truncate_,
                                           zero_pad_mean)


def test_hetlora_zero_pad_mean_is_the_hand_computed_average():
    # Prepare: client 1 of rank 1 (weight 1), client 2 of rank 2 (weight 3); global rank 2.
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [2.0]])
    a2, b2 = torch.tensor([[3.0, 4.0], [5.0, 6.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Execute
    a, b = zero_pad_mean([(a1, b1), (a2, b2)], [1.0, 3.0], rank=2)
    # Assert: row 2 of A / column 2 of B get client 1's zero padding
    assert torch.equal(a, torch.tensor([[2.5, 3.5], [3.75, 4.5]], dtype=torch.float64))
    assert torch.equal(b, torch.tensor([[1.0, 0.0], [0.5, 0.75]], dtype=torch.float64))


def test_truncate_keeps_the_leading_rank_components():
    a, b = torch.arange(6.0).view(3, 2), torch.arange(6.0).view(2, 3)
    truncate_(a, b, 1)
    assert torch.equal(a, torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(b, torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))


def test_svd_factors_are_the_truncated_svd_split_evenly():
    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn(6, 3, generator=generator, dtype=torch.float64)
             @ torch.randn(3, 5, generator=generator, dtype=torch.float64))  # rank 3
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    for rank in (1, 2):
        a, b = svd_factors(delta, rank)
        assert a.shape == (rank, 5) and b.shape == (6, rank)
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert torch.allclose(b @ a, expected, atol=1e-12)
        assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-12)  # sqrt(S) each side
    # rank above delta's: exact, the extra components zero
    a, b = svd_factors(delta, 4)
    assert torch.allclose(b @ a, delta, atol=1e-12)
    a, b = svd_factors(delta, 8)
    assert torch.all(a[5:] == 0) and torch.all(b[:, 5:] == 0)
    # the rank-r truncation is the first r components of the rank-R one (what a client gets)
    a4, b4 = svd_factors(delta, 4)
    a2, b2 = svd_factors(delta, 2)
    assert torch.allclose(b4[:, :2] @ a4[:2], b2 @ a2, atol=1e-12)


def test_flora_stacking_equals_the_weighted_sum_of_products():
    generator = torch.Generator().manual_seed(1)
    factors = [(torch.randn(r, 5, generator=generator, dtype=torch.float64),
                torch.randn(4, r, generator=generator, dtype=torch.float64)) for r in (1, 2, 3)]
    weights = [2.0, 1.0, 5.0]
    a, b = stack_lora(factors, weights)
    assert a.shape == (6, 5) and b.shape == (4, 6)  # rank 1 + 2 + 3
    expected = sum(w / 8.0 * (b_k @ a_k) for (a_k, b_k), w in zip(factors, weights))
    assert torch.allclose(b @ a, expected, atol=1e-12)


def test_client_ranks_are_given_drawn_from_the_seed_or_uniform():
    ft = FinetuneConfig(lora_aggregation="hetlora", lora_rank=4, client_ranks=[1, 4, 2])
    assert resolve_client_ranks(ft, 3, seed=0) == [1, 4, 2]
    with pytest.raises(ConfigError, match="'finetune.client_ranks': one rank per client: 4"):
        resolve_client_ranks(ft, 4, seed=0)
    drawn = FinetuneConfig(lora_aggregation="flora", lora_rank=8, client_rank_choices=[2, 8])
    ranks = resolve_client_ranks(drawn, 50, seed=3)
    assert ranks == resolve_client_ranks(drawn, 50, seed=3)  # deterministic
    assert set(ranks) == {2, 8} and ranks != resolve_client_ranks(drawn, 50, seed=4)
    assert resolve_client_ranks(FinetuneConfig(lora_aggregation="hetlora", lora_rank=3), 2, 0) == [3, 3]


@pytest.mark.parametrize("kwargs, key", [
    (dict(lora_aggregation="median"), "finetune.lora_aggregation"),
    (dict(lora_aggregation="fedavg", client_ranks=[2, 8]), "finetune.client_ranks"),
    (dict(lora_aggregation="fedsa", client_rank_choices=[8]), "finetune.client_rank_choices"),
    (dict(lora_aggregation="hetlora", client_ranks=[2, 0]), "finetune.client_ranks"),
    (dict(lora_aggregation="hetlora", client_ranks=[2, 4]), "finetune.lora_rank"),
    (dict(lora_aggregation="flora", client_ranks=[8], client_rank_choices=[8]),
     "finetune.client_ranks"),
])
def test_bad_variant_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        FinetuneConfig(**kwargs)


@pytest.mark.parametrize("variant, extra, key", [
    ("hetlora", ["finetune.client_ranks=[4,4,4]"], "finetune.client_ranks"),
    ("fedsa", ["client.algorithm=fedprox"], "client.algorithm"),
    ("hetlora", ["client.stateful_optimizer=true"], "client.algorithm"),
    ("flexlora", ["ema.enabled=true"], "ema.enabled"),
    ("flora", ["server.strategy=fedadam"], "server.strategy"),
    ("flora", ["privacy.enabled=true", "privacy.noise_multiplier=1.0"], "privacy.enabled"),
    ("hetlora", ["aggregation.uplink.name=qsgd"], "aggregation.uplink.name"),
    ("fedsa", ["aggregation.downlink=bf16"], "aggregation.downlink.name"),
    ("flexlora", ["aggregation.shared=['*lora_A*']"], "aggregation.shared"),
])
def test_variant_config_conflicts_name_the_key(tmp_path, variant, extra, key):
    from fedrun.config import load_config

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, ["data.name=image_folder", f"data.root={tmp_path}",
                           f"finetune.pretrained={tmp_path}", "finetune.instance_prompt=a photo",
                           "finetune.lora_rank=4", "num_clients=4", "ema.enabled=false",
                           f"finetune.lora_aggregation={variant}", f"output_dir={tmp_path / 'r'}",
                           *extra])
