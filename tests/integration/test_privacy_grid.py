"""The DP study's grid (configs/grids/privacy.yaml) end to end at toy size: a setup run made
once, pipelines that start from it, the tuning, the audit of every run, the clip-only control.
Its own file: the runs take about a minute, and the suite spreads files over its workers."""

import json

import pytest

from conftest import REPO
from fedrun.experiments.compare import compare


@pytest.mark.slow
def test_privacy_quick_grid_pretrains_once_tunes_and_audits(tmp_path, monkeypatch):
    """The DP study at toy size: the public pre-training (grid key setup) runs once and the
    LoRA pipeline starts from it ({output_dir}); each pipeline is tuned at epsilon 4
    and apart without DP, each variant at epsilon 4; every reporting run is audited; the
    clip-only control's epsilon is infinite."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "privacy"
    report = compare(str(REPO / "configs" / "grids" / "privacy.yaml"), quick=True,
                     output_dir=str(out), say=lambda *_: None).readme
    results = json.loads((report.parent / "results.json").read_text())
    assert not results["failures"] and results["study"]["tuning_runs"] == 5
    study = results["study"]  # the runs' own round times leave out their start-up
    assert 0 < study["reporting_rounds_s"] < study["reporting_run_s"]
    assert 0 < study["tuning_rounds_s"] < study["tuning_run_s"]
    by_name = {r["name"].partition("@")[0]: r for r in results["runs"]}
    assert len(by_name) == 7 and all(r["samples"] == 32 for r in by_name.values())
    public = out / "setup" / "public"
    assert (public / "final" / "model_index.json").is_file()
    config = (out / "runs" / "lora-eps4" / "p00" / "seed0" / "config.yaml").read_text()
    assert f"pretrained: {public}/final" in config
    assert "pretrained: null" in (out / "runs" / "scratch-eps4" / "p00" / "seed0" / "config.yaml").read_text()
    assert 0 < by_name["lora-eps4"]["epsilon"] <= 4.0 + 1e-6
    assert by_name["lora-clip"]["epsilon"] is None and by_name["lora-clip"]["noise_multiplier"] == 0
    assert "epsilon" not in by_name["lora-nodp"] and all("mia_auc" in r for r in by_name.values())
    text = report.read_text()
    assert "| lora-clip | ∞ (clip only, σ = 0) |" in text and "| lora-nodp | ∞ (no DP) |" in text
    assert "### Pipeline: lora" in text and "server momentum helps DP LoRA" in text
    assert "### lora-nodp" in text  # its own sweep
    assert (report.parent / "privacy_utility_leakage.png").stat().st_size > 5000
