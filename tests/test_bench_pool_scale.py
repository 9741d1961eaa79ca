"""Dry run of benchmarks/pool_scale.py (``--quick``: 20 and 60 generated volumes, 2 Gloo ranks under torchrun,
the disk cache shared by both sizes, a few steps): every rank reports, each drew only its half of the pool,
the cache was built once and reused, and the Markdown block carries the goals and the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.pool_scale import main

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with Gloo",
)


def test_quick_run_shards_the_pool_and_builds_the_disk_cache_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    res = main(["--quick", "--out", str(tmp_path / "out"), "--timeout", "300"])
    saved = json.loads((tmp_path / "out" / "pool_scale.json").read_text())
    assert sorted(saved["sizes"], key=int) == ["20", "60"] and saved["steps"] == 4
    for n, rows in saved["sizes"].items():
        assert [r["rank"] for r in rows] == [0, 1] and all(r["world_size"] == 2 for r in rows), n
        # data_shard="pool": each rank draws (and caches) only its half of the pool
        assert all(r["pool"] == int(n) and r["shard"] == int(n) // 2 for r in rows), n
        for r in rows:
            assert len(r["step_s"]) == 4 and r["steps_per_s"] > 0 and 0 < r["data_share"] < 1, n
            assert 100 < r["peak_rss_mib"] < 4000 and r["rss_mib"] <= r["peak_rss_mib"] + 1, n
    # one cache for every size and rank: the 60-volume run made only the 40 entries the 20-volume run lacked
    assert [saved["sizes"][n][0]["cache_entries_made"] for n in ("20", "60")] == [20, 40]
    assert len(list((tmp_path / "out" / "cache").rglob("*.pt"))) == 60
    g = saved["goals"]
    assert g["rss_flat"] == (g["rss_ratio"] <= 1.10) and g["throughput_ok"] == (g["throughput_ratio"] >= 0.90)
    assert g["rss_ratio"] < 1.10  # nothing per volume stays in memory (60 vs 20 volumes)
    assert res["goals"] == g
    m = saved["machine"]
    assert m["cores"] >= 1 and len(m["load_average_start"]) == 3
    md = (tmp_path / "out" / "pool_scale.md").read_text()
    assert md.startswith("### Pretraining pool scale") and "| 60 | 30 |" in md and md in capsys.readouterr().out
