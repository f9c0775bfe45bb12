"""``filterserve bench family`` and ``bench shared-base`` on tiny stand-ins: the report's shape, not its figures."""

from __future__ import annotations

import json

import psutil
import pytest

from filterserve.cli import main


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_merged_and_shared_side_by_side_in_one_report(tmp_path):
    family = tmp_path / "family"
    assert main(["bench", "family", "--out", str(family), "--count", "3"]) == 0
    listed = json.loads((family / "family.json").read_text())
    assert [(m["filter"], m["dimensions"], m["rank"]) for m in listed["members"]] == [
        ("filter_1", 8, 16), ("filter_2", 5, 8), ("filter_3", 8, 16)]

    out = tmp_path / "report"
    assert main(["bench", "shared-base", "--family", str(family), "--counts", "1,3", "--articles", "6", "--requests", "2",
                 "--batch", "2", "--tokens", "64", "--out", str(out)]) == 0
    assert not [p for p in psutil.Process().children(recursive=True) if "tritonserver" in p.name()]
    assert all((out / f"shared_base.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))
    report = json.loads((out / "shared_base.json").read_text())
    for kind in ("merged", "shared"):
        for n in ("1", "3"):
            served = report["served"][kind][n]
            assert served["fits"], served
            assert served["rss_after_batch"]["total_mb"] > 0 and served["throughput"]["results_per_s"] > 0
            assert {"median_p50_ms", "max_length_p50_ms"} <= set(served["latency"])
    # Merged, every filter has its own tensor model stub; shared, one holds them all.
    stubs = lambda kind: [m for m in report["served"][kind]["3"]["rss_after_batch"]["by_process_mb"] if m.endswith("_onnx")]  # noqa: E731
    assert len(stubs("merged")) == 3 and stubs("shared") == ["shared_base_onnx"]
    cost = report["lora_cost"]
    assert cost["group_size"] == 3 and 0 < cost["lora_flop_share"] < 1
    assert all(run["merged_ms"] > 0 and run["shared_ms"] > 0 for run in cost["runs"].values())
    assert {g["goal"].split(" ")[0] for g in report["goals"]} == {"RSS", "throughput", "single-filter"}
