"""Tests that need a CUDA GPU (``pytest -m cuda``; skipped without one). ``python -m bench.gpu``
runs them on the device machine; the logic they rely on is tested on CPU in test_gpu_path.py."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = ["num_clients=5", "clients_per_round=5", "rounds=2", "local_steps=2", "checkpoint.every=1",
         "sample.every=0", "device=cuda"]


def _final(run_dir, group="model"):
    return load_file(str(run_dir / "checkpoints" / "round_00002" / f"{group}.safetensors"))


def test_ranks_sharing_one_gpu_give_the_one_process_weights(tmp_path):
    """4 ranks on one GPU (gloo, buffer staged through pinned CPU memory) == 1 process."""
    one = run_cli(["train", *tiny(tmp_path / "ws1", *SHAPE)])
    assert one.returncode == 0, one.stderr[-3000:]
    four = run_cli(["train", *tiny(tmp_path / "ws4", *SHAPE)], torchrun_nproc=4)
    assert four.returncode == 0, four.stderr[-3000:]
    if torch.cuda.device_count() < 4:
        assert "NCCL refuses two ranks on one GPU" in four.stderr and "staged" in four.stderr
    a, b = _final(tmp_path / "ws1"), _final(tmp_path / "ws4")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_gpu(tiny_config, tmp_path, precision):
    from fedrun.engine import simulator

    simulator.run(tiny_config(*SHAPE, f"precision={precision}", output_dir=tmp_path / precision))
    final = _final(tmp_path / precision)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())


def test_central_through_accelerate_on_gpu(tiny_config, tmp_path):
    from fedrun.engine.central import run_central

    run_central(tiny_config(*SHAPE, "precision=bf16", output_dir=tmp_path / "central"))
    assert (tmp_path / "central" / "final" / "model_index.json").is_file()
