"""Dry run of benchmarks/predict.py (``--quick``: 2 real volumes, 1 round, a 2-step tiny model): the JSON and
Markdown it writes hold every mode with sane numbers, and the backends agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.predict import MODES, main


def test_quick_run_writes_json_and_markdown(tmp_path: Path, hippocampus_dir: Path, capsys: pytest.CaptureFixture) -> None:
    res = main(["--quick", "--data", str(hippocampus_dir), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "predict_bench.json").read_text())
    md = (tmp_path / "out" / "predict_bench.md").read_text()
    assert saved["goals"] == json.loads(json.dumps(res["goals"]))
    assert list(saved["modes"]) == list(MODES) and len(saved["volumes"]) == 2 and saved["rounds"] == 1
    # the last volumes of imagesTr: never among the finetuning cases (the first ones)
    assert saved["volumes"] == sorted(p.name for p in (hippocampus_dir / "imagesTr").glob("*.nii.gz"))[-2:]
    for mode, row in saved["modes"].items():
        assert row["s_per_volume"] > 0 and len(row["all_s_per_volume"]) == 1, mode
        assert 0 <= row["dice_mean"] <= 1 and row["peak_rss_mib"] > 50, mode
        st = row["stages_s_per_volume"]
        assert st["infer_s"] > 0 and st["read_s"] > 0 and st["write_s"] > 0, mode
        # same model, same preprocessing and sliding window: the same labels in every mode
        assert row["agreement_with_torch"] > 0.999, mode
    plain = saved["modes"]["plain loop"]["stages_s_per_volume"]
    assert plain["infer_s"] == pytest.approx(plain["window_s"] + plain["invert_s"])
    g = saved["goals"]
    assert g["fastest_backend"] in MODES[:3] and g["backend_speedup"] >= 1.0 and g["backend_dice_spread"] <= 1e-3
    assert g["predict_vs_plain_loop"] == pytest.approx(saved["modes"]["plain loop"]["s_per_volume"]
                                                       / saved["modes"]["predict[torch]"]["s_per_volume"])
    assert set(saved["export_check"]) == {"torchscript", "onnx"}  # medssl export's parity check, recorded
    assert all(c["argmax_agreement"] >= 0.9999 for c in saved["export_check"].values())
    m = saved["machine"]
    assert m["cores"] >= 1 and len(m["load_average_start"]) == 3 and m["torch_threads"] >= 1
    # the Markdown block printed for RESULTS.md: a table row per mode, the goals, the profile and the command
    assert md.startswith("### `medssl predict` speed") and md in capsys.readouterr().out
    assert all(f"| {mode} |" in md for mode in MODES)
    assert "goal ≥ 1.5×" in md and "goal ≥ 2×" in md and "Profile of a volume" in md and "Export parity" in md and "--quick" in md
