"""The privacy-utility report driver's --quick mode (tiny sizes, every kind of run, in process),
and its second call, which finds every step finished and only writes the report again."""

import json

import pytest

from scripts.privacy_report import main


@pytest.mark.slow
def test_quick_report_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "privacy"
    args = ["--quick", "--out", str(out), "--results", str(tmp_path / "report")]
    assert main(args) == 0
    report = json.loads((tmp_path / "report" / "privacy.json").read_text())
    names = [r["name"] for r in report["runs"]]
    assert names == ["digits_epsinf", "digits_eps4", "control_overfit", "lora_fedavg_epsinf",
                     "lora_fedavg_eps8", "lora_ffa_epsinf", "lora_ffa_eps8"]
    rows = {r["name"]: r for r in report["runs"]}
    assert rows["digits_epsinf"]["epsilon"] is None
    assert 0 < rows["digits_eps4"]["epsilon"] <= 4.0 and rows["lora_ffa_eps8"]["epsilon"] <= 8.0
    assert all(0 <= r["mia_auc"] <= 1 for r in report["runs"])
    assert "fid" in rows["digits_eps4"] and "nine_rate" in rows["lora_fedavg_eps8"]
    assert report["commit"] and report["quick"] and report["failed"] == []
    assert all(r["total_s"] > r["train_s"] > 0 for r in report["runs"])  # from the steps' records
    table = (tmp_path / "report" / "README.md").read_text()
    assert all(name in table for name in names)
    for name in ("privacy_utility.png", "control_overfit_closest_pairs.png"):
        assert (tmp_path / "report" / name).is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert "22 steps (22 already finished)" in capsys.readouterr().err
    assert json.loads((tmp_path / "report" / "privacy.json").read_text())["runs"] == report["runs"]
