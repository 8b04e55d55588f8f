"""LoRA fine-tuning of a pretrained DDPM U-Net (model.lora_rank): a tiny pre-training run on the
digits 0-4 (data.classes), then federated LoRA on 5-9 from its final/ folder. Only the LoRA
weights travel; the base stays frozen; final/ is a stock DDPMPipeline with LoRA merged (its
change to each target layer has rank <= r, every other weight is the pretrained one); a
checkpoint's EMA (LoRA only) samples through the same merge."""

import json

import pytest
import torch

from conftest import tiny
from fedrun.errors import ConfigError

RANK = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fedrun.config import load_config
    from fedrun.engine import simulator

    root = tmp_path_factory.mktemp("ddpm_lora")
    simulator.run(load_config(None, tiny(root / "pre", "rounds=2", "data.classes=[0,1,2,3,4]")))
    fine_tune = tiny(root / "ft", "rounds=2", "checkpoint.every=2", "data.classes=[5,6,7,8,9]",
                     f"model.pretrained={root / 'pre' / 'final'}", f"model.lora_rank={RANK}",
                     "optim.lr=0.05")
    simulator.run(load_config(None, fine_tune))
    return root, fine_tune


def test_only_the_lora_weights_travel_and_the_exported_unet_is_the_base_plus_a_low_rank_change(runs):
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    root, _ = runs
    base = DDPMPipeline.from_pretrained(str(root / "pre" / "final")).unet.state_dict()
    tuned = DDPMPipeline.from_pretrained(str(root / "ft" / "final")).unet.state_dict()
    assert tuned.keys() == base.keys()  # a plain UNet2DModel: no LoRA layers left
    ema = load_file(str(root / "ft" / "checkpoints" / "round_00002" / "ema.safetensors"))
    assert ema and all("lora_" in name for name in ema)  # the federated state is LoRA only
    records = [json.loads(line) for line in (root / "ft" / "metrics.jsonl").read_text().splitlines()]
    lora_bytes = 4 * sum(t.numel() for t in ema.values())
    assert records[0]["bytes_sent_per_client"] <= lora_bytes + 64  # fp32 LoRA weights (+ header)
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed and all(any(t in name for t in ("to_q", "to_k", "to_v", "to_out.0")) for name in changed)
    for name in changed:
        if name.endswith("weight"):  # merged W = W0 + (alpha / r) B A: a change of rank <= r
            delta = (tuned[name] - base[name]).double()
            assert torch.linalg.matrix_rank(delta, rtol=1e-6) <= RANK, name


def test_a_checkpoint_samples_the_merged_model(runs):
    from fedrun.config import load_config
    from fedrun.tasks.ddpm.task import DDPMTask
    from diffusers import DDPMPipeline

    root, fine_tune = runs
    task = DDPMTask(load_config(None, fine_tune))
    unet, _, label = task.load_model(root / "ft", "latest")
    final = DDPMPipeline.from_pretrained(str(root / "ft" / "final")).unet
    assert label == "round_00002" and unet.state_dict().keys() == final.state_dict().keys()
    for name, value in unet.state_dict().items():  # the same EMA weights, merged the same way
        torch.testing.assert_close(value, final.state_dict()[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides, says", [
    (["model.lora_rank=2"], "set model.pretrained"),
    (["model.lora_rank=0"], "must be >= 1"),
])
def test_bad_lora_configs_are_refused(overrides, says):
    from fedrun.config import load_config

    with pytest.raises(ConfigError, match="model.lora_rank") as error:
        load_config(None, overrides)
    assert says in str(error.value)


def test_an_unknown_target_module_is_refused_naming_the_key(runs):
    from fedrun.config import load_config
    from fedrun.engine import simulator

    root, fine_tune = runs
    cfg = load_config(None, [*fine_tune, "model.lora_target_modules=[no_such_layer]",
                             f"output_dir={root / 'bad'}"])
    with pytest.raises(ConfigError, match="model.lora_target_modules"):
        simulator.run(cfg)
