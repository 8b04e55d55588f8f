"""Evaluation and the comparison: FID/KID through the digits features, the centralized DDP
baseline (world size 1 vs 2 under torchrun), sampling shared by ranks, a tiny `compare`, and
bad inputs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny
from fedrun.cli import main as fedrun_main
from fedrun.config import load_config
from fedrun.errors import ConfigError, EvaluationError

CENTRAL = ["num_clients=4", "local_steps=2", "rounds=3", "checkpoint.every=1", "eval.every=3",
           "central.micro_batch=2",
           "eval.num_samples=32", "eval.steps=2", "eval.kid_subset_size=10", "sample.every=0"]


@pytest.fixture(scope="module")
def digits_evaluator():
    from fedrun.data import build_datasets
    from fedrun.eval.features import build_evaluator

    cfg = load_config(None, ["data.image_size=8"])
    train, heldout = build_datasets(cfg.data, cfg.seed)
    return build_evaluator(cfg.eval, train, heldout), train, heldout


def test_fid_of_a_set_against_itself_is_zero_and_rises_with_noise(digits_evaluator):
    evaluator, train, heldout = digits_evaluator
    reference = heldout.get_batch(np.arange(len(heldout)))
    itself = evaluator.score(reference)
    assert abs(itself.fid) < 1e-6
    assert itself.class_tv < 0.03  # the classifier reads the held-out digits' classes back
    clean = train.get_batch(np.arange(1000))
    generator = torch.Generator().manual_seed(0)
    fids = [evaluator.score((clean + s * torch.randn(clean.shape, generator=generator)).clamp(-1, 1)).fid
            for s in (0.0, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] > 3 * fids[0]
    floor = evaluator.floor(1000)
    assert 0.5 * fids[0] < floor.fid < 2 * fids[0]  # another 1,000 real training images
    report = evaluator.report(clean[:100])
    assert report["eval_samples"] == 100 and report["eval_floor_samples"] == 100
    assert "biased" in report["eval_warning"]  # fewer than 1,000 samples


class _PixelClassifier(torch.nn.Module):
    """A stand-in for the digits classifier: the class of an image is its first pixel."""

    num_classes = 3

    def forward(self, images):
        return images.flatten(1).double()

    def predict(self, images):
        return images.flatten(1)[:, 0].round().long()


def test_class_mix_tv_and_rarest_class_against_hand_computation():
    from fedrun.eval.features import Evaluator

    def images(classes):  # first pixel = class, the others vary so the features have a covariance
        out = torch.rand((len(classes), 1, 2, 2), generator=torch.Generator().manual_seed(len(classes)))
        out[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float32)
        return out

    reference_labels = np.array([0, 1, 2, 2])
    evaluator = Evaluator(images([0, 1, 2, 2]), images([0, 1, 2] * 3), _PixelClassifier(), "pixel",
                          reference_labels=reference_labels, kid_subset_size=2)
    # samples: 3 x class 0, 1 x class 1, 4 x class 2 -> fractions (3/8, 1/8, 4/8) vs (1/4, 1/4, 1/2)
    scores = evaluator.score(images([0, 0, 0, 1, 2, 2, 2, 2]))
    assert scores.class_fractions == [0.375, 0.125, 0.5]
    assert scores.class_tv == pytest.approx(0.5 * (0.125 + 0.125 + 0.0))
    assert (scores.min_class, scores.min_class_fraction) == (1, 0.125)
    record = evaluator.report(images([0, 0, 0, 1, 2, 2, 2, 2]))
    assert record["min_class"] == 1 and record["min_class_fraction"] == 0.125
    assert record["reference_class_fractions"] == [0.25, 0.25, 0.5]
    # a class absent from the samples is the rarest, with fraction 0 (ties: the lowest label)
    missing = evaluator.score(images([0, 0, 2, 2]))
    assert (missing.min_class, missing.min_class_fraction) == (1, 0.0)
    assert evaluator.score(images([2, 2, 2, 2])).min_class == 0
    # held-out images without class 0 (data.classes a subset): class 0 is not a lost class, the
    # rarest is taken among the classes the held-out images hold
    subset = Evaluator(images([1, 2, 2, 2]), images([1, 2] * 3), _PixelClassifier(), "pixel",
                       reference_labels=np.array([1, 2, 2, 2]), kid_subset_size=2)
    scores = subset.score(images([1, 2, 2, 2, 2, 2, 0, 0]))  # fractions (2/8, 1/8, 5/8)
    assert (scores.min_class, scores.min_class_fraction) == (1, 0.125)
    record = subset.report(images([1, 2, 2, 2, 2, 2, 0, 0]))
    # collect recomputes it from the class mix (records written before this rule hold class 0)
    from fedrun.experiments.collect import rarest
    assert rarest({**record, "min_class": 0, "min_class_fraction": 0.25}) == (1, 0.125)
    # and the share of the samples in the held-out images' classes (None where they hold all)
    from fedrun.experiments.collect import in_classes
    assert in_classes(record) == 0.75
    assert in_classes(evaluator.report(images([0, 0, 0, 1, 2, 2, 2, 2]))) is None


def test_unknown_and_unavailable_feature_extractors_are_clear_errors():
    from fedrun.eval.features import build_feature_extractor

    with pytest.raises(ConfigError, match="eval.feature.*unknown feature extractor 'clip'"):
        load_config(None, ["eval.feature=clip"])
    with pytest.raises(ConfigError, match="unknown feature extractor 'clip'.*digits, inception"):
        build_feature_extractor("clip")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:  # the usual case here: say what is missing and how to supply the weights
        with pytest.raises(EvaluationError, match="torch-fidelity.*weights-inception-2015-12-05.*"
                                                  "eval.inception_weights="):
            build_feature_extractor("inception")


def test_bad_run_directories_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert fedrun_main(["sample", "--run", str(missing)]) == 2
    assert f"run directory '{missing}' does not exist" in capsys.readouterr().err
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert fedrun_main(["evaluate", "--run", str(not_a_run)]) == 2
    assert "not a fedrun run directory (it has no config.yaml)" in capsys.readouterr().err
    # a run that stopped before its first checkpoint: a config.yaml and nothing to sample from
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    from fedrun.config import to_yaml

    (unfinished / "config.yaml").write_text(to_yaml(load_config(None, tiny(unfinished))))
    assert fedrun_main(["sample", "--run", str(unfinished)]) == 2
    assert "has no checkpoint and no final/ folder: nothing to sample from" in capsys.readouterr().err
    assert fedrun_main(["evaluate", "--run", str(unfinished), "feature=clip"]) == 2
    assert "unknown feature extractor 'clip'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def central_runs(tmp_path_factory):
    """The same central config in this process (world size 1) and under torchrun with 2 ranks."""
    from fedrun.engine.central import run_central
    from fedrun.eval.sampling import open_run, sample_run

    root = tmp_path_factory.mktemp("central")
    run_central(load_config(None, tiny(root / "ws1", *CENTRAL)))
    cfg = open_run(root / "ws1", ["eval.num_samples=300", "eval.steps=2", "threads=1"])
    sample_run(root / "ws1", cfg, checkpoint="latest", out=str(root / "samples_ws1"))
    proc = run_cli([str(root / "ws2"), str(root / "samples_ws2"), *tiny(root / "ws2", *CENTRAL)],
                   torchrun_nproc=2, module="tests/central_check.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_central_world_size_1_and_2_give_the_same_weights(central_runs):
    weights = [load_file(str(central_runs / f"ws{w}" / "checkpoints" / "round_00003" / "model.safetensors"))
               for w in (1, 2)]
    diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    print(f"central world size 1 vs 2: max abs weight difference {diff:.3g}")
    assert diff == 0.0  # same micro-batches on 1 and 2 ranks: bit-identical (see centralized.py)
    from fedrun.tasks.ddpm.model import build_unet

    cfg = load_config(None, tiny(central_runs / "ws1", *CENTRAL))
    init = build_unet(cfg.model, 8, 1, cfg.seed).state_dict()
    assert max(float((weights[0][k] - init[k]).abs().max()) for k in init) > 1e-3  # it trained


def test_central_metrics_budget_and_bytes(central_runs):
    records = {w: [json.loads(x) for x in (central_runs / f"ws{w}" / "metrics.jsonl").read_text().splitlines()]
               for w in (1, 2)}
    params = sum(t.numel() for t in load_file(str(
        central_runs / "ws1" / "checkpoints" / "round_00003" / "model.safetensors")).values())
    for world, recs in records.items():
        # budget of the federated run of the same config: rounds x K x E x B = 3 x 4 x 2 x 4
        assert [r["samples"] for r in recs] == [32, 64, 96]
        assert recs[-1]["steps"] == 24
        assert recs[-1]["bytes_per_step"] == 2 * (world - 1) * 4 * params
        assert recs[-1]["bytes_total"] == 24 * 2 * (world - 1) * 4 * params
        assert "fid" in recs[-1] and "floor_fid" in recs[-1] and recs[-1]["eval_samples"] == 32
        assert "fid" not in recs[0]  # eval.every=3
    for a, b in zip(records[1], records[2]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert records[1][-1]["fid"] == pytest.approx(records[2][-1]["fid"], rel=1e-3, abs=1e-3)
    assert (central_runs / "ws1" / "samples" / "eval_round_00003.png").is_file()
    assert (central_runs / "ws1" / "final" / "model_index.json").is_file()


def test_sampling_shared_by_ranks_gives_the_same_images(central_runs):
    one, two = (np.load(central_runs / f"samples_ws{w}" / "samples.npz")["images"] for w in (1, 2))
    assert one.shape == (300, 8, 8, 1) and two.shape == one.shape
    # two ranks drew different chunks from different models' float sums: allow 1/255 rounding
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
    info = json.loads((central_runs / "samples_ws2" / "info.json").read_text())
    assert info["world_size"] == 2 and info["model"] == "round_00003"


def test_evaluate_verb_on_a_run_and_on_saved_samples(central_runs, capsys):
    run = central_runs / "ws1"
    assert fedrun_main(["evaluate", "--run", str(run), "n=40", "steps=2", "checkpoint=3"]) == 0
    record = json.loads((run / "evaluation_round_00003_digits.json").read_text())
    assert record["eval_samples"] == 40 and record["fid"] > record["floor_fid"] >= 0
    assert "biased" in record["eval_warning"]
    assert fedrun_main(["evaluate", "--run", str(run), f"samples={central_runs / 'samples_ws1'}"]) == 0
    record = json.loads((run / "evaluation_samples_digits.json").read_text())
    assert record["eval_samples"] == 300
    assert "FID" in capsys.readouterr().err


TINY_GRID = """
seeds: [0, 1]
samples: 64
eval_every_samples: 32
ema_horizon_samples: 128
overrides: {overrides}
runs:
  - {{name: central, kind: central}}
  - {{name: C2-E1, overrides: [num_clients=2, local_steps=1]}}
  - {{name: C4-E2, overrides: [num_clients=4, local_steps=2]}}
series:
  - {{name: clients, file: fid_vs_samples_clients.png, runs: [central, C2-E1, C4-E2]}}
findings:
  - {{claim: fed close to central, kind: close, runs: [C4-E2, central]}}
  - {{claim: worse with more clients, kind: increasing, runs: [C2-E1, C4-E2]}}
quick:
  seeds: [0, 1]
  overrides: [eval.num_samples=24, eval.steps=2, eval.kid_subset_size=8]
"""


@pytest.mark.slow
def test_quick_compare_writes_table_plots_and_findings(tmp_path, capsys):
    overrides = json.dumps([x for x in tiny(tmp_path) if not x.startswith("output_dir")])
    grid = tmp_path / "grid.yaml"
    grid.write_text(TINY_GRID.format(overrides=overrides))
    args = ["compare", "--grid", str(grid), "--quick", "--out", str(tmp_path / "grid")]
    assert fedrun_main(args) == 0
    report = tmp_path / "grid" / "report"
    text = (report / "README.md").read_text()
    for name in ("central", "C2-E1", "C4-E2"):
        assert f"| {name} | " in text
    assert "± " in text and "floor FID" in text and "bytes communicated" in text
    assert "**fed close to central**" in text and "**worse with more clients**" in text
    assert "Warning:" in text  # 24 samples: biased
    for png in ("fid_vs_samples_clients.png", "bytes_vs_fid.png"):
        assert (report / png).stat().st_size > 5000
    results = json.loads((report / "results.json").read_text())
    assert len(results["runs"]) == 6 and {r["samples"] for r in results["runs"]} == {64}
    # every run is evaluated at the same sample counts
    assert {tuple(s for s, _ in r["curve"]) for r in results["runs"]} == {(32, 64)}
    # a second call collects the finished runs instead of training them again
    before = (tmp_path / "grid" / "runs" / "C2-E1" / "seed0" / "metrics.jsonl").stat().st_mtime
    assert fedrun_main(args) == 0
    assert (tmp_path / "grid" / "runs" / "C2-E1" / "seed0" / "metrics.jsonl").stat().st_mtime == before
    assert "6 already finished" in capsys.readouterr().err


def test_compare_rejects_a_budget_that_does_not_divide_into_rounds(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [0]\nsamples: 100\neval_every_samples: 50\n"
                    "runs:\n  - {name: a, overrides: [num_clients=4, local_steps=2]}\n")
    from fedrun.experiments.grid import load_grid, plan

    with pytest.raises(ConfigError, match="grid run 'a': samples \\(100\\) is not a multiple .*128"):
        plan(load_grid(str(grid)))


def test_resumed_central_run_equals_uninterrupted_run(tmp_path):
    """The AdamW state is part of the central checkpoint: resuming continues exactly."""
    from fedrun.engine.central import run_central

    shape = ["num_clients=2", "local_steps=2", "checkpoint.every=1"]
    run_central(load_config(None, tiny(tmp_path / "full", *shape, "rounds=4")))
    run_central(load_config(None, tiny(tmp_path / "resumed", *shape, "rounds=2")))
    run_central(load_config(None, tiny(tmp_path / "resumed", *shape, "rounds=4", "resume=auto")))
    for group in ("model", "ema", "optimizer"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "round_00004" / f"{group}.safetensors"))
                for r in ("full", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group


def test_eval_at_scores_only_those_rounds_and_the_same_as_every_round(tmp_path):
    """``eval.at`` evaluates after the listed rounds only; evaluating does not touch training's
    randomness, so its scores equal those of a run evaluated after every round."""
    from pathlib import Path

    from fedrun.engine import simulator

    shape = ["rounds=3", "local_steps=1", "checkpoint.every=0", "sample.every=0", "threads=1",
             "eval.num_samples=32", "eval.steps=2", "eval.kid_subset_size=10"]
    previous = torch.get_num_threads()
    records = {}
    try:
        for name, schedule in (("every", ["eval.every=1"]), ("at", ["eval.every=0", "eval.at=[1,3]"])):
            cfg = load_config(None, tiny(tmp_path / name, *shape, *schedule))
            simulator.run(cfg)
            lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
            records[name] = {r["round"]: r for r in map(json.loads, lines)}
    finally:
        torch.set_num_threads(previous)
    assert [r for r, rec in records["at"].items() if "fid" in rec] == [1, 3]
    assert [r for r, rec in records["every"].items() if "fid" in rec] == [1, 2, 3]
    for r in (1, 3):
        assert records["at"][r]["fid"] == records["every"][r]["fid"]
        assert records["at"][r]["train_loss"] == records["every"][r]["train_loss"]
    with pytest.raises(ConfigError, match="eval.at"):
        load_config(None, tiny(tmp_path / "bad", "eval.at=[0]"))
