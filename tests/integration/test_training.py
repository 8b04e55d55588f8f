"""In-process (world size 1) training runs: equivalence with plain SGD, resume, and bad inputs."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from fedrun.engine import simulator
from fedrun.config import load_config
from fedrun.errors import CheckpointError, ConfigError, DataError


def _weights(run_dir, round_, group="model"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"round_{round_:05d}" / f"{group}.safetensors"))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_client_one_round_equals_a_hand_written_adamw_loop(tiny_config, tmp_path):
    """C=1, E=3, T=1: FedAvg (server lr 1) equals three AdamW steps with weight decay and active
    gradient clipping, written out by hand with stock diffusers and torch, bit for bit. (One
    step would prove little: Adam's first step is about lr * sign(g) whatever the betas, the
    clipping or the gradient's scale.)"""
    from diffusers import UNet2DModel

    from fedrun.fl.local import batch_indices, client_generator
    from fedrun.data import partition_indices
    from fedrun.tasks.ddpm.task import DDPMTask

    # aggregation.exact=false: exact mode rounds the update to a fixed-point grid, so the global
    # model would be w + round_to_grid(delta), not w + delta. Uniform weighting: the update is
    # summed with weight 1 and divided by 1, so the server step is w + (w_c - w) with no
    # rounding beyond the subtraction and the addition, which the hand loop repeats.
    cfg = tiny_config("num_clients=1", "local_steps=3", "rounds=1", "optim.weight_decay=0.1",
                      "optim.grad_clip=0.05", "optim.betas=[0.8,0.95]", "server.weighting=uniform",
                      "aggregation.exact=false")
    simulator.run(cfg)
    federated = _weights(cfg.output_dir, 1)

    task = DDPMTask(cfg)
    built = task.build(torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in built.model.state_dict().items())

    def hand_loop(grad_clip, weight_decay):
        unet.load_state_dict(start)
        client = partition_indices(built.dataset.labels, len(built.dataset), 1, cfg.partition,
                                   cfg.seed)[0]
        generator = client_generator(cfg.seed, client=0, global_round=0)
        batches = batch_indices(client, 3, cfg.optim.batch_size, generator)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.8, 0.95),
                                      weight_decay=weight_decay)
        losses, norms = [], []
        for indices in batches:
            loss = task.loss(unet, indices, generator)
            optimizer.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)))
            optimizer.step()
            losses.append(loss.item())
        # FedAvg with one client of weight 1 and server lr 1: w + (w_c - w)
        return {k: start[k] + (v - start[k]) for k, v in unet.state_dict().items()}, losses, norms

    central, losses, norms = hand_loop(grad_clip=0.05, weight_decay=0.1)
    assert min(norms) > 0.05  # the clipping was active at every step
    assert federated.keys() == central.keys()
    assert all(torch.equal(federated[k], central[k]) for k in federated)
    first = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    # controls: without the clipping, or without the weight decay, the weights differ
    for grad_clip, weight_decay in ((1e9, 0.1), (0.05, 0.0)):
        other, _, _ = hand_loop(grad_clip, weight_decay)
        assert not all(torch.equal(federated[k], other[k]) for k in federated)


def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path):
    shape = ["num_clients=3", "clients_per_round=2", "rounds=4", "checkpoint.every=2",
             "server.strategy=fedavgm", "local_epochs=0.1"]
    full = tiny_config(*shape, output_dir=tmp_path / "full")
    simulator.run(full)

    first_half = tiny_config(*shape, "rounds=2", output_dir=tmp_path / "resumed")
    simulator.run(first_half)
    assert (tmp_path / "resumed" / "final").is_dir()
    second_half = tiny_config(*shape, "resume=auto", output_dir=tmp_path / "resumed")
    simulator.run(second_half)

    for group in ("model", "ema", "server"):
        a, b = _weights(tmp_path / "full", 4, group), _weights(tmp_path / "resumed", 4, group)
        assert a.keys() == b.keys() and a, group
        assert all(torch.equal(a[k], b[k]) for k in a), group
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["samples"] == json.loads(full_lines[-1])["samples"]
    assert json.loads(lines[-1])["train_loss"] == json.loads(full_lines[-1])["train_loss"]


def test_existing_run_is_refused_and_left_intact(tiny_config, tmp_path):
    cfg = tiny_config("rounds=1")
    simulator.run(cfg)
    before = _snapshot(Path(cfg.output_dir))
    with pytest.raises(CheckpointError, match="already holds a run.*resume=auto.*overwrite=true"):
        simulator.run(tiny_config("rounds=1"))
    assert _snapshot(Path(cfg.output_dir)) == before

    # resume=auto on a finished run: nothing to do, nothing changed but config/metrics rewrite
    simulator.run(tiny_config("rounds=1", "resume=auto"))
    after = _snapshot(Path(cfg.output_dir))
    assert after["checkpoints/round_00001/model.safetensors"] == before["checkpoints/round_00001/model.safetensors"]

    # overwrite=true really starts again
    simulator.run(tiny_config("rounds=1", "overwrite=true", "seed=5"))
    assert _snapshot(Path(cfg.output_dir))["checkpoints/round_00001/model.safetensors"] != \
        before["checkpoints/round_00001/model.safetensors"]


def test_changed_config_is_refused_naming_the_keys(tiny_config):
    simulator.run(tiny_config("rounds=1"))
    with pytest.raises(CheckpointError, match=r"local_steps: 2 -> 3; optim\.lr: 0\.001 -> 0\.002"):
        simulator.run(tiny_config("rounds=2", "resume=auto", "optim.lr=2e-3", "local_steps=3"))


def test_a_checkpoint_older_than_an_option_resumes_while_the_option_is_at_its_default(tiny_config, capsys):
    """A checkpoint written before data.classes existed (its config view without the key, its
    digest of that view) resumes with the key at its default, and is refused with the key set."""
    from fedrun.config import digest_view

    cfg = tiny_config("rounds=1")
    simulator.run(cfg)
    state_file = Path(cfg.output_dir) / "checkpoints" / "round_00001" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["data"]["classes"]  # as an older fedrun wrote it
    state["config_digest"] = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()[:16]
    state_file.write_text(json.dumps(state))
    assert "classes" in digest_view(cfg)["data"]
    with pytest.raises(CheckpointError, match=r"data\.classes: \(not in the checkpoint\) -> \[1, 2\]"):
        simulator.run(tiny_config("rounds=2", "resume=auto", "data.classes=[1,2]"))
    simulator.run(tiny_config("rounds=2", "resume=auto"))
    assert "written before the options data.classes existed" in capsys.readouterr().out
    assert [json.loads(x)["round"] for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_truncated_checkpoint_is_a_clear_error_and_nothing_is_deleted(tiny_config):
    cfg = tiny_config("rounds=2", "checkpoint.every=1")
    simulator.run(cfg)
    model_file = Path(cfg.output_dir) / "checkpoints" / "round_00002" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    before = _snapshot(Path(cfg.output_dir))
    with pytest.raises(CheckpointError, match="round_00002/model.safetensors' is corrupt or truncated"):
        simulator.run(tiny_config("rounds=3", "checkpoint.every=1", "resume=auto"))
    assert _snapshot(Path(cfg.output_dir)) == before
    # an explicit earlier checkpoint still resumes
    earlier = Path(cfg.output_dir) / "checkpoints" / "round_00001"
    simulator.run(tiny_config("rounds=3", "checkpoint.every=1", f"resume={earlier}"))
    assert (Path(cfg.output_dir) / "checkpoints" / "round_00003" / "state.json").is_file()


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="'clients_per_round': must be between 1 and num_clients=4"):
        load_config(None, ["num_clients=4", "clients_per_round=5"])
    with pytest.raises(ConfigError, match="'local_steps': must be >= 1"):
        load_config(None, ["local_steps=0"])
    with pytest.raises(ConfigError, match="'rounds'.*could not be converted"):
        load_config(None, ["rounds=many"])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml", [])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["rounds"])


def test_every_shipped_config_loads():
    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(str(path), [])


def test_missing_data_folder_is_a_data_error(tiny_config, tmp_path):
    cfg = tiny_config("data.name=image_folder", f"data.root={tmp_path / 'no_such_folder'}")
    with pytest.raises(DataError, match="no_such_folder"):
        simulator.run(cfg)


def test_image_folder_run_with_a_corrupt_file(tiny_config, tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    cfg = tiny_config("data.name=image_folder", f"data.root={root}", "rounds=1", "num_clients=2",
                      "model.attention_head_dim=4")
    with pytest.raises(DataError, match="broken.jpg"):
        simulator.run(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    # with skip_corrupt the run trains on the 12 good images, 3 channels
    run_dir = simulator.run(tiny_config("data.name=image_folder", f"data.root={root}", "rounds=1",
                                        "num_clients=2", "data.skip_corrupt=true", "overwrite=true"))
    assert _weights(run_dir, 1)["conv_in.weight"].shape[1] == 3


@pytest.mark.slow
def test_cli_reports_errors_in_one_line(tmp_path):
    proc = run_cli(["train", "num_clients=2", "clients_per_round=3", f"output_dir={tmp_path}"])
    assert proc.returncode == 2
    assert "error: config key 'clients_per_round'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(["train", "bogus.key=1"])
    assert proc.returncode == 2 and "unknown config key 'bogus'" in proc.stderr


def test_default_threads_do_not_depend_on_the_world_size(monkeypatch, tiny_config, tmp_path):
    """The claim behind test_world_size_invariance at the default settings: a CPU kernel's
    reductions depend on its thread count (positive control: one client's local steps with 1 and
    2 threads differ), so the default gives every CPU rank 1 thread whatever the number of ranks
    (at 9dcece4 it gave each rank its share of the cores: 2 threads alone, 1 beside another)."""
    from fedrun.engine import dist
    from fedrun.engine import simulator
    from fedrun.fl.local import batch_indices, client_generator
    from fedrun.fl.clients import train_client

    cfg = tiny_config("sample.every=0")
    assert cfg.threads is None
    previous = torch.get_num_threads()
    try:
        for local_world in ("1", "2"):
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
            dist.init("cpu", threads=cfg.threads)
            assert torch.get_num_threads() == 1, local_world
        trained = []
        for threads in (1, 2):
            fed = simulator.setup(tiny_config("sample.every=0", f"threads={threads}",
                                              output_dir=tmp_path / f"t{threads}"))
            assert torch.get_num_threads() == threads
            generator = client_generator(0, 0, 0)
            batches = batch_indices(fed.run.client_indices[0], 2, 4, generator)
            train_client(fed.run.model, fed.run.params.params, fed.run.task.loss, batches, generator,
                         fed.run.cfg.optim, fed.run.device)
            trained.append(fed.run.params.flat.clone())
        assert not torch.equal(trained[0], trained[1])
    finally:
        torch.set_num_threads(previous)
