"""The class-conditional DiT task (fedrun/tasks/dit/), a task that is one folder: a tiny DiT
trains in process, its export loads with stock diffusers, `fedrun sample` / `evaluate` score the
requested labels, bad dit.* values are refused by name, 2 processes under torchrun give the
weights of 1, and no code of fedrun outside the folder refers to it."""

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from fedrun.cli import main as fedrun_main
from fedrun.config import load_config
from fedrun.errors import ConfigError

# A DiT of 2 blocks of width 32 on 8x8 digits (16 patches), 240 images: a round takes ~0.1 s.
# 3 clients, so that one of 2 ranks sums two clients' updates.
DIT_TINY = [
    "task.name=dit", "data.image_size=8", "data.max_samples=240",
    "num_clients=3", "rounds=3", "local_steps=2", "optim.batch_size=4", "optim.lr=1e-3",
    "checkpoint.every=1", "sample.num_images=10", "sample.steps=2",
    "eval.every=3", "eval.num_samples=40", "eval.steps=2", "eval.kid_subset_size=10",
    "logging.wandb=false", "logging.progress=false",
]
DIT_FOLDER = REPO / "fedrun" / "tasks" / "dit"


def dit_overrides(output_dir, *extra):
    return DIT_TINY + [f"output_dir={output_dir}", *extra]


def _group(run_dir, group, round_=3):
    return load_file(str(Path(run_dir) / "checkpoints" / f"round_{round_:05d}" / f"{group}.safetensors"))


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A finished tiny DiT run, trained in this process (world size 1)."""
    from fedrun.engine import simulator

    out = tmp_path_factory.mktemp("dit") / "run"
    simulator.run(load_config(None, dit_overrides(out)))
    return out


def test_dit_trains_and_its_export_is_the_ema_for_stock_diffusers(dit_run):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from fedrun.tasks.dit.model import build_transformer

    records = _records(dit_run)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # the training moved the weights away from the seeded initial model
    cfg = load_config(str(dit_run / "config.yaml"))
    init = build_transformer(cfg.dit, 8, 1, cfg.seed).state_dict()
    trained = _group(dit_run, "model")
    assert trained.keys() == init.keys()
    assert max(float((trained[k] - init[k]).abs().max()) for k in trained) > 1e-3
    # final/ loads with stock diffusers and holds exactly the final checkpoint's EMA weights
    final = dit_run / "final"
    exported = DiTTransformer2DModel.from_pretrained(final, subfolder="transformer").state_dict()
    ema = _group(dit_run, "ema")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    config = DiTTransformer2DModel.load_config(final, subfolder="transformer")
    assert config["num_embeds_ada_norm"] == 10 and config["out_channels"] == config["in_channels"] == 1
    assert DDPMScheduler.from_pretrained(final, subfolder="scheduler").config.num_train_timesteps == 1000
    assert json.loads((final / "id2label.json").read_text()) == {str(k): str(k) for k in range(10)}
    assert json.loads((final / "fedrun_dit.json").read_text())["null_class"] == 10
    # the grid: one row per class (10 rows of one 8x8 sample, upscaled to 256 px, 2 px padding)
    from PIL import Image

    width, height = Image.open(dit_run / "samples" / "round_00003.png").size
    assert height == 10 * (width - 2) + 2
    # the evaluation during training reports the label accuracy next to FID and its floor
    last = records[-1]
    assert 0.0 <= last["label_accuracy"] <= 1.0 and len(last["label_accuracy_per_class"]) == 10
    assert math.isfinite(last["fid"]) and math.isfinite(last["floor_fid"])


def test_sample_and_evaluate_score_the_requested_labels(dit_run, tmp_path):
    out = tmp_path / "samples"
    assert fedrun_main(["sample", "--run", str(dit_run), "n=30", "steps=2", f"out={out}"]) == 0
    with np.load(out / "samples.npz") as data:
        assert data["images"].shape == (30, 8, 8, 1)
        assert data["labels"].tolist() == [i % 10 for i in range(30)]
    assert fedrun_main(["evaluate", "--run", str(dit_run), "n=30", "steps=2",
                        "eval.kid_subset_size=10"]) == 0
    record = json.loads((dit_run / "evaluation_final_digits.json").read_text())
    assert 0.0 <= record["label_accuracy"] <= 1.0
    assert len(record["label_accuracy_per_class"]) == 10
    assert math.isfinite(record["fid"]) and math.isfinite(record["floor_fid"])
    assert record["eval_samples"] == record["eval_floor_samples"] == 30
    # the label accuracy is the classifier's agreement with the requested labels: recompute it
    from fedrun.eval.features import DigitsFeatures
    from fedrun.eval.sampling import draw_all
    from fedrun.tasks.base import build_task
    from fedrun.tasks.dit.sampling import predicted_classes

    cfg = load_config(str(dit_run / "config.yaml"), ["eval.steps=2"])
    images, labels = draw_all(build_task(cfg).load_sampler(dit_run, None), 30)
    predicted = predicted_classes(DigitsFeatures(), images)
    assert record["label_accuracy"] == pytest.approx(float(np.mean(predicted == labels)))


def test_a_chunk_of_samples_depends_only_on_its_index(dit_run):
    """Chunk i asks for labels (250 i + j) mod 10 and draws its noise from (eval.seed, i): the
    same whoever draws it, whatever was drawn before."""
    from fedrun.tasks.base import build_task

    sampler = build_task(load_config(str(dit_run / "config.yaml"), ["eval.steps=2"])).load_sampler(dit_run, None)
    first_images, first_labels = sampler.draw(12, 1)
    sampler.draw(5, 0)
    again_images, again_labels = sampler.draw(12, 1)
    assert first_labels.tolist() == [(250 + j) % 10 for j in range(12)] == again_labels.tolist()
    assert np.array_equal(first_images, again_images)


def test_bad_dit_values_are_refused_naming_the_key(tmp_path):
    dit = ["task.name=dit", "data.image_size=8"]
    cases = [
        (["dit.patch_size=0"], "'dit.patch_size': must be >= 1"),
        (["dit.patch_size=3"], "'data.image_size': 8 is not a multiple of dit.patch_size=3"),
        (["dit.class_dropout=1.5"], "'dit.class_dropout': must be in"),
        (["dit.class_dropout=0", "dit.guidance_scale=3"], "'dit.guidance_scale'.*never trains"),
        (["dit.guidance_scale=0.5"], "'dit.guidance_scale': must be >= 1"),
        (["dit.num_attention_heads=3", "dit.attention_head_dim=5"], "'dit.attention_head_dim'.*multiple of 4"),
        (["dit.num_classes=12"], "'dit.num_classes': the digits have 10 classes"),
        (["dit.learn_sigma=true"], "unknown config key 'dit.learn_sigma'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, dit + overrides)
    # the dit section belongs to task dit only: unknown to ddpm (the default task)
    for overrides in (["dit.patch_size=2"], ["task.name=ddpm", "dit.guidance_scale=3"]):
        with pytest.raises(ConfigError, match="config section 'dit' belongs to task 'dit'"):
            load_config(None, overrides)


def test_data_without_labels_is_refused(tmp_path):
    from PIL import Image

    from fedrun.tasks.base import build_task

    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    cfg = load_config(None, ["task.name=dit", "data.image_size=8", "data.name=image_folder",
                             f"data.root={tmp_path}", "data.grayscale=true",
                             f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="'data.name': task 'dit' is class-conditional.*gave none"):
        build_task(cfg).build(torch.device("cpu"))


# ---------------------------------------------------------------- the task is a plugin

def _documentation(tree):
    """The string constants that are documentation: bare string statements (docstrings of
    modules, classes, functions, and attribute docstrings of config fields)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def dit_references(source):
    """(line, what) of every place the code (not its prose) refers to the dit task: an import of
    fedrun.tasks.dit, a "dit" / "dit.<key>" / "tasks.dit" string, a `.dit` attribute (cfg.dit),
    a DiT... name."""
    tree = ast.parse(source)
    prose = _documentation(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if node.value == "dit" or node.value.startswith("dit.") or re.search(r"\btasks\.dit\b", node.value):
                found.append((node.lineno, repr(node.value)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
            found += [(node.lineno, f"import {m}") for m in modules if re.search(r"\btasks\.dit\b", m)]
        elif isinstance(node, ast.Attribute) and node.attr == "dit":
            found.append((node.lineno, ".dit"))
        name = _identifier(node)
        if name is not None and name.startswith("DiT"):
            found.append((getattr(node, "lineno", 0), name))
    return found


def _identifier(node):
    """The name a node introduces or uses: a variable, an attribute, an imported name, a class
    or function being defined (None for other nodes)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, (ast.alias, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name
    return None


def test_the_dit_task_is_one_folder_that_nothing_else_refers_to():
    # discovered by folder: listed without importing it (a fresh interpreter)
    probe = ("import sys; from fedrun.registry import TASKS; "
             "print('dit' in TASKS.names(), any(m.startswith('fedrun.tasks.dit') for m in sys.modules))")
    listed = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert listed.stdout.split() == ["True", "False"], listed.stderr[-2000:]
    # no code of the package outside the folder refers to the task
    core = [p for p in sorted((REPO / "fedrun").rglob("*.py"))
            if DIT_FOLDER not in p.parents and "__pycache__" not in p.parts]
    assert len(core) > 40
    references = [f"{p.relative_to(REPO)}:{line}: {what}" for p in core
                  for line, what in dit_references(p.read_text())]
    assert references == []
    # ... and the scan does see such references where they are: in the folder itself
    inside = dit_references((DIT_FOLDER / "task.py").read_text())
    assert any(what == "'dit'" for _, what in inside) and any(what == ".dit" for _, what in inside)
    assert len(dit_references("from fedrun.tasks.dit import DiTTask\n")) == 2  # module and name
    assert dit_references("if cfg.task.name == 'dit':\n    scale = cfg.dit.guidance_scale\n") != []
    assert dit_references('"""Tasks: ``fedrun.tasks.dit``, task.name: dit."""\n') == []


# ---------------------------------------------------------------- world-size invariance

@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_and_share_the_sampling(dit_run, tmp_path):
    """torchrun with 2 gloo ranks (3 clients: rank 0 sums two) gives == weights to the
    in-process run; `fedrun sample` under 2 ranks (rank 1 draws chunk 1) gives the samples of
    1 process."""
    out = tmp_path / "ws2"
    proc = run_cli(["train", *dit_overrides(out)], torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for group in ("model", "ema"):
        one, two = _group(dit_run, group), _group(out, group)
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), group
    assert [r["train_loss"] for r in _records(out)] == [r["train_loss"] for r in _records(dit_run)]

    settings = ["n=260", "steps=2"]  # two chunks of 250 and 10
    # `torchrun -m fedrun sample --run R` cannot be typed: torchrun's own argument parser refuses
    # `--run` as an ambiguous abbreviation of its --run-path / --run_path. The 2-rank `fedrun
    # sample` gets its arguments from a script instead.
    script = tmp_path / "sample_on_two_ranks.py"
    args = ["sample", "--run", str(out), *settings, f"out={tmp_path / 'two'}"]
    script.write_text(f"import sys\nfrom fedrun.cli import main\nsys.exit(main({args!r}))\n")
    proc = run_cli([], torchrun_nproc=2, module=str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "info.json").read_text())["world_size"] == 2
    assert fedrun_main(["sample", "--run", str(dit_run), *settings, f"out={tmp_path / 'one'}"]) == 0
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(one["labels"], np.arange(260) % 10)
        assert np.array_equal(one["labels"], two["labels"])
        assert np.array_equal(one["images"], two["images"])
