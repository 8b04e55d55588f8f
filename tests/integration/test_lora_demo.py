"""The federated LoRA demo's --quick mode (every stage at toy size, in process: ~25 s on an idle
2-core machine): the report's numbers and grids, then a second call that finds every stage
finished and only writes the report again."""

import json

import pytest

from scripts.lora_demo import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path / "demo"), "--results", str(tmp_path / "results")]
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "lora_digits.json").read_text())
    for name in ("before", "after", "after_prior_preservation"):
        assert 0.0 <= report[name]["nine_rate"] <= 1.0 and 0.0 <= report[name]["prior_preservation"] <= 1.0
        assert (tmp_path / "results" / f"{name}.png").is_file()
    assert list(report["after"]["seeds"]) == ["0"] and report["finetune_seeds"] == [0]
    assert report["communication"]["bytes_ratio_vs_full_unet"] < 0.1  # LoRA factors, not the U-Net
    assert set(report["timings_s"]) == {"vae_and_base_s", "pretrain_s", "prior_images_s", "finetune_lora_s",
                                        "finetune_lora_prior_s", "evaluate_s", "total_s"}
    assert all(seconds > 0 for seconds in report["timings_s"].values()) and report["commit"]
    capsys.readouterr()
    assert main(args) == 0
    assert "6 steps (6 already finished)" in capsys.readouterr().err
    again = json.loads((tmp_path / "results" / "lora_digits.json").read_text())
    assert again["after"] == report["after"] and again["timings_s"]["pretrain_s"] == report["timings_s"]["pretrain_s"]


@pytest.mark.slow
def test_quick_demo_of_the_lora_variants_reports_their_bytes(tmp_path):
    args = ["--quick", "--out", str(tmp_path / "demo"), "--results", str(tmp_path / "results"),
            "--variants", "fedavg", "fedsa", "hetlora", "--prior-images", "0"]
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "lora_digits.json").read_text())
    assert set(report["bytes"]) == {"after_fedavg", "after_fedsa", "after_hetlora"}
    fedavg, fedsa = report["bytes"]["after_fedavg"], report["bytes"]["after_fedsa"]
    # fedsa sends A only: fewer bytes than fedavg's A and B, both ways
    assert 0 < fedsa["up_per_client_round"] < fedavg["up_per_client_round"]
    assert fedsa["down_per_client_round"] < fedavg["down_per_client_round"]
    assert 0.0 <= report["after_hetlora"]["nine_rate"] <= 1.0
    assert "finetune_lora_hetlora_s" in report["timings_s"]
