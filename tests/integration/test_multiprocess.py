"""Real multi-process runs: gloo process groups of 2, 3 and 4 ranks started by torchrun.

One module-scoped fixture launches tests/dist_check.py four times -- world size 1 (no torchrun)
and torchrun with 2, 3 and 4 ranks -- each training the same tiny config (C=6, 5 clients per
round, Dirichlet alpha 0.3, AdamW, 3 rounds, exact aggregation) and the same job with a toy piece
in every seam (stateful client algorithm, seeded transforms, custom strategy). Ranks then sum 5,
3+2, 2+2+1 and 2+1+1+1 clients. The tests compare the outputs: the final weights must be
bit-identical (==). Start-up dominates (diffusers import per rank), hence one launch per world
size. World size 3 sends every all-reduce through the CPU staging copy that ranks sharing a GPU
use (FEDRUN_STAGE_COLLECTIVES=1).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny
from toy_algorithms import ALGORITHM_VARIANTS

pytestmark = pytest.mark.slow  # four torchrun launches (world sizes 1-4) in one fixture

SHAPE = ["num_clients=6", "clients_per_round=5", "partition.method=dirichlet", "partition.alpha=0.3",
         "rounds=3", "local_steps=2", "checkpoint.every=1", "sample.every=0"]
WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    outputs = {}
    for world in WORLDS:
        wandb = ["logging.wandb=true", "logging.wandb_mode=offline"] if world == 1 else []
        # World size 3 reduces through a CPU staging copy, the path of ranks that share a GPU.
        env = {"FEDRUN_STAGE_COLLECTIVES": "1"} if world == 3 else None
        proc = run_cli([str(root / "checks"), *tiny(root / f"ws{world}", *SHAPE, *wandb)],
                       torchrun_nproc=world if world > 1 else None, module="tests/dist_check.py",
                       env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((root / "checks" / f"check_ws{world}.json").read_text())
        outputs[world] = {"dir": root / f"ws{world}", "report": report, "stderr": proc.stderr}
    return outputs


def _final_weights(run_dir, group="model"):
    return load_file(str(run_dir / "checkpoints" / "round_00003" / f"{group}.safetensors"))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduced_update_equals_one_process_weighted_mean(runs, world):
    report = runs[world]["report"]
    assert report["world_size"] == world
    reduction = report["reduction"]
    assert reduction["max_abs_diff"] < 1e-6
    assert reduction["total_weight"] == reduction["expected_total_weight"]
    assert reduction["losses_match"]
    assert reduction["rank_compute_s"] == [float(r + 1) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_world_size_invariance(runs, world):
    """1, 2, 3 and 4 processes give bit-identical weights (exact aggregation), with several
    clients summed on one rank."""
    reference = _final_weights(runs[1]["dir"])
    other = _final_weights(runs[world]["dir"])
    assert reference.keys() == other.keys()
    diff = max(float((reference[k] - other[k]).abs().max()) for k in reference)
    print(f"world size 1 vs {world}: max abs weight difference {diff:.3g}")
    assert diff == 0.0 and all(torch.equal(reference[k], other[k]) for k in reference)
    # The training really moved the weights (a comparison of two untrained models proves nothing).
    from fedrun.config import load_config
    from fedrun.tasks.ddpm.model import build_unet

    cfg = load_config(None, tiny(runs[1]["dir"], *SHAPE))
    init = build_unet(cfg.model, 8, 1, cfg.seed).state_dict()
    moved = max(float((reference[k] - init[k]).abs().max()) for k in reference)
    assert moved > 1e-3


@pytest.mark.parametrize("variant", ["stateful", *ALGORITHM_VARIANTS])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_seam_is_world_size_invariant(runs, world, variant):
    """The toy stateful client algorithm (client state store + a buffer segment), the seeded
    update and server transforms and the toy strategy; SCAFFOLD (control-variate segment) with
    FedAdam and stateful SGD; FedProx with FedYogi and stateful AdamW; the codecs with error
    feedback both ways (qsgd up / randk down, topk up / bf16 down): == across world sizes."""
    one, many = (runs[w]["dir"].with_name(runs[w]["dir"].name + "_" + variant) for w in (1, world))
    groups = ("model", "ema", "server", "client_algorithm")
    if (one / "checkpoints" / "round_00003" / "downlink.safetensors").exists():
        groups += ("downlink",)
    for group in groups:
        a, b = _final_weights(one, group), _final_weights(many, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    states = sorted(p.relative_to(one) for p in (one / "client_state").rglob("*.safetensors"))
    assert states and states == sorted(p.relative_to(many) for p in (many / "client_state").rglob("*.safetensors"))
    for path in states:
        a, b = load_file(str(one / path)), load_file(str(many / path))
        assert all(torch.equal(a[k], b[k]) for k in a), path


@pytest.mark.parametrize("world", [2, 3, 4])
def test_metrics_are_identical_across_world_sizes(runs, world):
    records = [json.loads(line) for line in (runs[world]["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    reference = [json.loads(line) for line in (runs[1]["dir"] / "metrics.jsonl").read_text().splitlines()]
    for mine, ref in zip(records, reference):
        assert mine["clients"] == ref["clients"] and len(mine["clients"]) == 5
        assert mine["samples"] == ref["samples"]
        assert mine["train_loss"] == ref["train_loss"] and mine["client_loss"] == ref["client_loss"]
        assert len(mine["local_compute_s_per_rank"]) == world


def test_run_directory_layout_and_logging(runs):
    run_dir = runs[1]["dir"]
    for name in ("config.yaml", "metrics.jsonl", "partition.json", "samples/round_00003.png",
                 "checkpoints/round_00003/state.json", "final/model_index.json"):
        assert (run_dir / name).exists(), name
    # keep_last=3 of checkpoint.every=1 over 3 rounds: 1, 2, 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["round_00001", "round_00002", "round_00003"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("round", "samples", "train_loss", "client_loss", "bytes_sent_per_client",
                "bytes_received_per_client", "bytes_round", "bytes_total", "round_time_s",
                "local_compute_s", "aggregation_s"):
        assert key in record, key
    params = sum(t.numel() for t in _final_weights(run_dir).values())
    assert record["bytes_sent_per_client"] == 4 * params
    assert record["bytes_total"] == 3 * 5 * 2 * 4 * params  # rounds x clients x (send + receive)
    sizes = json.loads((run_dir / "partition.json").read_text())["sizes"]
    assert sum(sizes) == 216 and len(set(sizes)) > 1  # 240 - 10 % held out, label skew
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B run missing"


def test_exported_pipeline_loads_in_stock_diffusers(runs):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(runs[1]["dir"] / "final"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    assert torch.isfinite(torch.from_numpy(out.images)).all()
    # final/ holds the EMA weights of the last checkpoint
    ema = load_file(str(runs[1]["dir"] / "checkpoints" / "round_00003" / "ema.safetensors"))
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
