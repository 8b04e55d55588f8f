"""Federated LoRA fine-tuning (``fedrun finetune``) on a tiny Stable Diffusion pipeline.

A tiny StableDiffusionPipeline (word-level CLIP tokenizer, small CLIP text encoder, AutoencoderKL,
UNet2DConditionModel) is assembled from configs and saved to a temporary folder; every run loads
it through the same ``from_pretrained`` path a real checkpoint takes (HF_HUB_OFFLINE=1, set in
conftest). Module-scoped fixtures run each configuration once: fedavg in-process (world size 1),
ffa in-process, and fedavg under torchrun with 2 ranks (one launch).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

INSTANCE = "a photo of sks digit"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def finetune_overrides(pipeline, subject, output_dir, *extra):
    return ["data.name=image_folder", f"data.root={subject}", "data.image_size=8",
            "data.grayscale=true", f"finetune.pretrained={pipeline}",
            f"finetune.instance_prompt={INSTANCE}", "finetune.lora_rank=4",
            "num_clients=4", "local_steps=2", "rounds=2", "optim.batch_size=2", "optim.lr=1e-2",
            "ema.enabled=false", "sample.num_images=2", "sample.steps=2",
            "finetune.guidance_scale=2.0", "checkpoint.every=1", "logging.wandb=false",
            "logging.progress=false", "threads=1", f"output_dir={output_dir}", *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(pipeline folder, subject folder of 8 digit-nine images 8x8)."""
    from PIL import Image

    from fedrun.config import DataConfig
    from fedrun.data import build_datasets
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline

    root = tmp_path_factory.mktemp("finetune")
    pipeline = build_tiny_pipeline(root / "tiny_sd", block_out_channels=(16, 32), image_size=8)
    data, _ = build_datasets(DataConfig(image_size=8, heldout_fraction=0.0), 0)
    subject = root / "subject"
    subject.mkdir()
    nines = np.flatnonzero(data.labels == 9)[:8]
    for i in nines:
        pixels = ((data.get_batch([i])[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.numpy(), mode="L").save(subject / f"nine_{i}.png")
    return pipeline, subject


class RecordingTask:
    """Builds a FinetuneTask that also keeps each client's trained federated vector."""

    @staticmethod
    def make(cfg):
        from fedrun.tasks.sd_lora.task import FinetuneTask

        class Recording(FinetuneTask):
            def observe_client(self, run, client, weight, global_round):
                self.names = list(run.params.names)  # the order of the flat vector
                self.trained.setdefault(global_round, []).append(
                    (run.params.flat.detach().clone(), weight))
                super().observe_client(run, client, weight, global_round)

        task = Recording(cfg)
        task.trained = {}
        return task


def _run(pipeline, subject, output_dir, *extra):
    from fedrun.engine import simulator
    from fedrun.config import load_config

    cfg = load_config(None, finetune_overrides(pipeline, subject, output_dir, *extra))
    task = RecordingTask.make(cfg)
    simulator.run(cfg, task)
    return Path(output_dir), task


@pytest.fixture(scope="module")
def fedavg_run(assets, tmp_path_factory):
    return _run(*assets, tmp_path_factory.mktemp("fedavg") / "run")


@pytest.fixture(scope="module")
def ffa_run(assets, tmp_path_factory):
    return _run(*assets, tmp_path_factory.mktemp("ffa") / "run", "finetune.lora_aggregation=ffa",
                "rounds=1")


def load_into_stock_pipeline(pipeline, lora_dir):
    """Stock diffusers: the pipeline, LoRA loaded with ``load_lora_weights``, and how much that
    moved a 3-step sample (max absolute pixel change)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(INSTANCE, num_inference_steps=3, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    return pipe, float(np.abs(sample() - before).max())


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir, done):
    return load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / "model.safetensors"))


def _expected_lora_count(unet, rank, with_a=True):
    """sum r*(d_in + d_out) over the target projections, read off the base U-Net."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            total += rank * ((module.in_features if with_a else 0) + module.out_features)
    return total


def test_tiny_pipeline_loads_through_from_pretrained(assets):
    from diffusers import StableDiffusionPipeline

    from fedrun.tasks.sd_lora.lora import load_text_to_image

    pipeline, _ = assets
    assert all((pipeline / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder"))
    parts = load_text_to_image(str(pipeline), torch.device("cpu"))
    assert type(parts.unet).__name__ == "UNet2DConditionModel"
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert parts.tokenizer(INSTANCE, add_special_tokens=False).input_ids.__len__() == 5  # one token a word
    assert not any(p.requires_grad for m in (parts.unet, parts.vae, parts.text_encoder)
                   for p in m.parameters())
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None,
                                                   requires_safety_checker=False)
    out = pipe(INSTANCE, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 8, 8, 1)


def test_attach_lora_counts_and_ffa_freezes_a(assets):
    from fedrun.tasks.sd_lora.lora import attach_lora, load_text_to_image

    pipeline, _ = assets
    unet = load_text_to_image(str(pipeline), torch.device("cpu")).unet
    expected = _expected_lora_count(unet, 4)
    assert attach_lora(unet, 4, None, TARGETS, seed=0) == expected
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected
    ffa = load_text_to_image(str(pipeline), torch.device("cpu")).unet
    expected_b = _expected_lora_count(ffa, 4, with_a=False)
    attach_lora(ffa, 4, None, TARGETS, seed=0, freeze_a=True)
    trainable = [n for n, p in ffa.named_parameters() if p.requires_grad]
    assert all(".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in ffa.parameters() if p.requires_grad) == expected_b
    # the seeded init: the same A on every rank / run
    a1 = {n: p for n, p in unet.named_parameters() if ".lora_A." in n}
    a2 = {n: p for n, p in ffa.named_parameters() if ".lora_A." in n}
    assert all(torch.equal(a1[n], a2[n]) for n in a1)


def test_aggregation_error_hand_computed():
    from fedrun.tasks.sd_lora.lora import aggregation_error

    # Two equally weighted clients with 1x1 factors: B1 = A1 = 1, B2 = A2 = 3.
    # mean(BA) = (1 + 9) / 2 = 5; mean(B) mean(A) = 2 * 2 = 4; error = |5 - 4| / 5 = 0.2
    assert aggregation_error(torch.tensor([5.0]), torch.tensor([4.0])) == pytest.approx(0.2)
    # Frobenius norm over all layers together: [3, 4] vs [3, 0] -> 4 / 5
    assert aggregation_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(0.8)
    assert aggregation_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_only_lora_weights_travel_and_the_base_is_untouched(assets, fedavg_run):
    from fedrun.tasks.sd_lora.lora import load_text_to_image

    run_dir, task = fedavg_run
    base_unet = load_text_to_image(str(assets[0]), torch.device("cpu")).unet
    base = base_unet.state_dict()
    lora_count = _expected_lora_count(base_unet, 4)
    # the round buffer is the federated vector: the LoRA parameters, nothing else
    weights = _checkpoint(run_dir, 2)
    assert all(".lora_A." in n or ".lora_B." in n for n in weights)
    assert sum(t.numel() for t in weights.values()) == lora_count
    records = _metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["bytes_sent_per_client"] == 4 * lora_count
        assert record["bytes_full_unet_per_client"] == 4 * sum(t.numel() for t in base.values())
        assert record["bytes_ratio_vs_full_unet"] < 0.2
        assert record["bytes_round"] == 2 * 4 * lora_count * 4  # 4 clients, send + receive
    # base weights bit-identical after training
    trained = {n.replace(".base_layer", ""): p for n, p in task.parts.unet.state_dict().items()
               if "lora_" not in n}
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[n], base[n]) for n in base)


def test_fedavg_averages_a_and_b_separately(fedavg_run):
    run_dir, task = fedavg_run
    names = task.names
    for done in (1, 2):
        clients = task.trained[done - 1]
        assert len(clients) == 4
        total = sum(w for _, w in clients)
        expected = sum(v.double() * w for v, w in clients) / total
        got = torch.cat([_checkpoint(run_dir, done)[n].reshape(-1) for n in names]).double()
        assert float((got - expected).abs().max()) < 1e-6
    # both A and B moved (fedavg trains both)
    first = _checkpoint(run_dir, 1)
    assert any(float(first[n].abs().max()) > 0 for n in names if ".lora_B." in n)


def test_fedavg_aggregation_error_is_logged_and_matches_a_hand_computation(fedavg_run):
    run_dir, task = fedavg_run
    record = _metrics(run_dir)[-1]
    assert record["aggregation_error_reduce_bytes"] > 0
    names = task.names
    shapes = {n: t.shape for n, t in _checkpoint(run_dir, 2).items()}
    clients = task.trained[1]
    total = sum(w for _, w in clients)

    def split(vector):
        out, offset = {}, 0
        for n in names:
            k = shapes[n].numel()
            out[n] = vector[offset: offset + k].reshape(shapes[n]).double()
            offset += k
        return out

    states = [(split(v), w) for v, w in clients]
    mean = {n: sum(s[n] * w for s, w in states) / total for n in names}
    num = den = 0.0
    for a_name in [n for n in names if ".lora_A." in n]:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        mean_product = sum(s[b_name] @ s[a_name] * w for s, w in states) / total
        num += float((mean_product - mean[b_name] @ mean[a_name]).norm() ** 2)
        den += float(mean_product.norm() ** 2)
    expected = (num / den) ** 0.5
    assert expected > 1e-4  # separate averaging is inexact
    assert record["lora_aggregation_error"] == pytest.approx(expected, rel=1e-3)


def test_ffa_is_exact_and_sends_only_b(assets, ffa_run):
    run_dir, task = ffa_run
    record = _metrics(run_dir)[0]
    weights = _checkpoint(run_dir, 1)
    assert weights and all(".lora_B." in n for n in weights)
    from fedrun.tasks.sd_lora.lora import load_text_to_image

    base_unet = load_text_to_image(str(assets[0]), torch.device("cpu")).unet
    assert record["bytes_sent_per_client"] == 4 * _expected_lora_count(base_unet, 4, with_a=False)
    assert record["lora_aggregation_error"] < 1e-6
    # by hand: mean over clients of B_c A equals the aggregated B times the shared A
    from fedrun.tasks.sd_lora.lora import lora_modules

    a_of = {name + ".lora_B.default.weight": a.detach().double() for name, a, _ in lora_modules(task.parts.unet)}
    clients = task.trained[0]
    total = sum(w for _, w in clients)
    offset = 0
    for name in task.names:
        tensor = weights[name]
        k = tensor.numel()
        a = a_of[name]
        mean_product = sum(v[offset: offset + k].reshape(tensor.shape).double() @ a * w
                           for v, w in clients) / total
        assert float((mean_product - tensor.double() @ a).abs().max()) < 1e-6
        offset += k
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_saved_lora_loads_with_stock_load_lora_weights_and_changes_the_output(assets, fedavg_run):
    run_dir, _ = fedavg_run
    for name in ("samples/base.png", "samples/round_00002.png", "final/fedrun_lora.json"):
        assert (run_dir / name).is_file(), name
    saved = load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))
    assert any(".lora_B." in k or "lora.up" in k for k in saved)
    assert max(float(t.abs().max()) for k, t in saved.items() if "lora_B" in k or "lora.up" in k) > 0
    pipe, change = load_into_stock_pipeline(assets[0], run_dir / "final")
    assert change > 1e-4
    # the loaded adapter holds exactly the final global LoRA weights
    final = _checkpoint(run_dir, 2)
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(final)
    for name, tensor in final.items():
        match = [p for n, p in loaded.items() if n.replace(".default_0.", ".default.") == name]
        assert len(match) == 1, name
        assert torch.equal(match[0].detach().float(), tensor)


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_lora(assets, tmp_path):
    # Three clients: world size 1 sums c0 + c1 + c2, world size 2 sums (c0 + c2) + c1. Exact
    # aggregation (the default) makes the sum independent of the grouping: bit-identical LoRA.
    shape = ("num_clients=3", "rounds=2")
    one_dir, _ = _run(*assets, tmp_path / "ws1", *shape)
    proc = run_cli(["finetune", *finetune_overrides(*assets, tmp_path / "ws2", *shape)],
                   torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2" in proc.stderr
    one = load_file(str(one_dir / "final" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "ws2" / "final" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k or "lora.up" in k) > 0
    ws1, ws2 = _metrics(one_dir), _metrics(tmp_path / "ws2")
    for mine, ref in zip(ws2, ws1):
        assert mine["clients"] == ref["clients"]
        # The diagnostic's products travel in their own plain fp32 reduction (not the exact
        # round buffer), so their sum depends on the grouping in the last bits.
        assert mine["lora_aggregation_error"] == pytest.approx(ref["lora_aggregation_error"], rel=1e-6)
        assert mine["train_loss"] == ref["train_loss"]


def _cli_error(capsys, *args):
    from fedrun.cli import main

    code = main(["finetune", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_are_clear_errors(assets, tmp_path, capsys):
    pipeline, subject = assets
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error(capsys, *finetune_overrides(pipeline, empty, tmp_path / "r1"))
    assert "no image files found" in err and str(empty) in err
    err = _cli_error(capsys, *finetune_overrides(pipeline, subject, tmp_path / "r2",
                                                 "finetune.prompts_file=captions.jsonl"))
    assert "finetune.prompts_file 'captions.jsonl' does not exist" in err
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (no_unet / part).symlink_to(pipeline / part)
    err = _cli_error(capsys, *finetune_overrides(no_unet, subject, tmp_path / "r3"))
    assert "finetune.pretrained" in err and "no unet/ subfolder" in err
    err = _cli_error(capsys, *finetune_overrides(pipeline, subject, tmp_path / "r4",
                                                 "finetune.lora_aggregation=median"))
    assert "finetune.lora_aggregation" in err


def test_resumed_ffa_run_equals_an_uninterrupted_one(assets, tmp_path):
    """ffa's frozen A is not in the checkpoint: it is re-derived from the seed on resume."""
    _run(*assets, tmp_path / "resumed", "finetune.lora_aggregation=ffa", "rounds=1")
    from fedrun.engine import simulator
    from fedrun.config import load_config
    from fedrun.tasks.sd_lora.task import FinetuneTask

    full = tmp_path / "full"
    _run(*assets, full, "finetune.lora_aggregation=ffa", "rounds=2")
    cfg = load_config(None, finetune_overrides(*assets, tmp_path / "resumed",
                                               "finetune.lora_aggregation=ffa", "rounds=2",
                                               "resume=auto"))
    simulator.run(cfg, FinetuneTask(cfg))
    one = load_file(str(full / "final" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "resumed" / "final" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any("lora_A" in k or "lora.down" in k for k in one)  # A is exported too


def test_prior_preservation_with_class_images(assets, tmp_path, capsys):
    import shutil

    pipeline, subject = assets
    err = _cli_error(capsys, *finetune_overrides(pipeline, subject, tmp_path / "r0",
                                                 "finetune.class_prompt=a photo of the digit"))
    assert "finetune.class_data_dir" in err
    # class images with their own prompts (metadata.jsonl); class_prompt covers the rest
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    files = sorted(p.name for p in subject.iterdir())
    for name in files[:3]:
        shutil.copy(subject / name, class_dir / name)
    (class_dir / "metadata.jsonl").write_text(
        json.dumps({"file_name": files[0], "text": "a photo of the digit three"}) + "\n")
    run_dir, task = _run(pipeline, subject, tmp_path / "run", "rounds=1",
                         "finetune.class_prompt=a photo of the digit nine",
                         f"finetune.class_data_dir={class_dir}",
                         "finetune.class_prompts_file=metadata.jsonl",
                         "finetune.aggregation_error_every=0")
    assert task.prompts == ["", INSTANCE, "a photo of the digit nine", "a photo of the digit three"]
    assert task.class_prompt_ids.tolist() == [3, 2, 2]
    assert task.class_latents.encoded == 1  # the class images were encoded and used
    record = _metrics(run_dir)[0]
    assert "lora_aggregation_error" not in record and record["train_loss"] > 0


def test_central_with_a_finetune_config_is_the_centralized_lora_baseline(assets, tmp_path, capsys):
    """`fedrun central` on a fine-tuning config: the union of the clients' images, the federated
    budget in samples, only the LoRA weights trained, final/ loads with stock diffusers; and
    `fedrun sample` / `evaluate` refuse such a run with a clear error."""
    from diffusers import StableDiffusionPipeline

    from fedrun.cli import main

    run_dir = tmp_path / "central"
    assert main(["central", *finetune_overrides(*assets, run_dir)]) == 0, capsys.readouterr().err
    records = _metrics(run_dir)
    # rounds x K x E x B of the federated config: 2 x 4 x 2 x 2 = 32 samples, in 2 central rounds
    assert [r["samples"] for r in records] == [16, 32] and records[-1]["steps"] == 16
    final = _checkpoint(run_dir, 2)
    assert final and all("lora_" in name for name in final)  # the federated vector: LoRA only
    pipe = StableDiffusionPipeline.from_pretrained(str(assets[0]), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(run_dir / "final"))
    loaded = {n.replace(".default_0.", ".default."): p for n, p in pipe.unet.named_parameters()
              if "lora_" in n}
    assert loaded.keys() == final.keys()
    assert all(torch.equal(loaded[k].detach().float(), final[k]) for k in final)
    assert max(float(t.abs().max()) for k, t in final.items() if "lora_B" in k) > 0  # it trained
    capsys.readouterr()
    for verb in ("sample", "evaluate"):
        assert main([verb, "--run", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"run '{run_dir}' is a 'sd_lora' run" in err and "load_lora_weights" in err, verb


@pytest.mark.parametrize("extra", [
    ["client.algorithm=scaffold", "server.strategy=fedadam", "optim.name=sgd", "optim.lr=0.1",
     "optim.momentum=0", "optim.grad_clip=null"],
    ["client.algorithm=fedprox", "client.prox_mu=0.1", "server.strategy=fedyogi",
     "client.stateful_optimizer=true", "finetune.lora_aggregation=ffa"],
])
def test_federated_optimisation_algorithms_run_on_the_lora_vector(assets, tmp_path, extra):
    """SCAFFOLD / FedProx, adaptive servers and stateful client optimizers act on the federated
    vector, which in fine-tuning is the LoRA weights (only B under FFA): their state has its size."""
    run_dir, task = _run(*assets, tmp_path / "run", *extra)
    numel = sum(t.numel() for t in _checkpoint(run_dir, 2).values())
    assert all(v.numel() == numel for v in load_file(str(
        run_dir / "checkpoints" / "round_00002" / "server.safetensors")).values())
    state = load_file(str(sorted((run_dir / "client_state" / "client_000000").iterdir())[-1]))
    per_param = [k for k, v in state.items() if v.numel() > 1]
    assert per_param and all(state[k].numel() == numel for k in per_param)
    if "client.algorithm=scaffold" in extra:
        assert "control" in state
        assert _metrics(run_dir)[-1]["bytes_sent_per_client"] == 2 * 4 * numel
    first, last = task.trained[0][0][0], task.trained[1][0][0]
    assert not torch.equal(first, last)
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").exists()


def test_lora_with_a_codec_and_personal_b(assets, tmp_path):
    """The LoRA vector goes through the codecs and partial exchange like any federated vector:
    4-bit qsgd on A only (B personal, FedSA-LoRA's exchange) sends under 0.15 x A's fp32 bytes,
    and the exported LoRA still loads in stock diffusers."""
    run_dir, _ = _run(*assets, tmp_path / "run", "rounds=2", "aggregation.uplink.name=qsgd",
                      "aggregation.uplink.bits=4", "aggregation.shared=['*lora_A*']")
    weights = _checkpoint(run_dir, 2)
    a_count = sum(t.numel() for n, t in weights.items() if ".lora_A." in n)
    assert 0 < a_count < sum(t.numel() for t in weights.values())
    for record in _metrics(run_dir):
        assert all(v <= 0.15 * 4 * a_count for v in record["bytes_up_per_client"].values())
        assert set(record["bytes_down_per_client"].values()) == {4 * a_count}
    assert load_into_stock_pipeline(assets[0], run_dir / "final")[1] > 0
