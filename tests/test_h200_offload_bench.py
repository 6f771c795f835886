"""Smoke test of bench/h200_offload_bench.py: its --tiny mode runs every phase on the CPU in seconds.

The H200 run is expensive and unattended, so its whole flow (model generation, bandwidths, every ratio and tier,
the transformers baseline in its subprocess, the report and its merge) is exercised here on a tiny model; the
derived figures are checked on numbers worked by hand.
"""

from __future__ import annotations

import json

import pytest
from repo_scripts import bench_module, run_bench

RUN_FIELDS = ("ratio", "tier", "kernel", "decode_tok_s", "prefill_tok_s", "ttft_s", "peak_device_bytes", "hit_rate",
              "bytes_per_token", "efficiency")
PHASES = ("gen", "bw_memory", "warm_page_cache", "ours_host", "baselines", "bw_disk", "ours_disk")


def _run(*args: str) -> None:
    done = run_bench("h200_offload_bench", "--tiny", *args, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("h200-bench")
    out = str(root / "report.json")
    _run("--model-dir", str(root / "model"), "--out", out)
    with open(out) as handle:
        return json.load(handle), root


def test_every_phase_ran(tiny_report):
    report, _ = tiny_report
    assert report["schema"].startswith("moe-offload/h200-offload-bench/")
    assert report["mode"] == "tiny" and report["device"] == "cpu"
    for name in PHASES:
        status = report["phases"][name]["status"]
        assert status == "done" or (name == "bw_memory" and status.startswith("skipped")), (name, status)
    assert report["model_generation"]["generated"] is True
    assert {"torch", "transformers", "accelerate", "safetensors"} <= set(report["versions"])
    assert report["bandwidth"]["disk_odirect_gb_s"] > 0 and report["bandwidth"]["disk_odirect_parallel_gb_s"] > 0
    assert report["bandwidth"].get("h2d_pinned_9mb_gb_s") is None  # CUDA only
    assert report["hbm_floor_bytes_per_token"] > 0 and report["hbm_floor_s_per_token"] is None


def test_runs_have_numbers(tiny_report):
    report, _ = tiny_report
    runs = {(r["ratio"], r["tier"]): r for r in report["runs"]}
    assert set(runs) == {(100, "host"), (50, "host"), (25, "host"), (10, "host"), (0, "host"), (25, "disk")}
    for run in runs.values():
        assert "error" not in run, run.get("error")
        assert set(RUN_FIELDS) <= set(run)
        for field in ("decode_tok_s", "prefill_tok_s", "ttft_s"):
            assert run[field] > 0, field
        assert 0 <= run["hit_rate"] <= 1 and run["bytes_per_token"] >= 0
        assert len(run["repeats"]) == 2  # --tiny runs --repeats 2, on both tiers
        if run["tier"] == "host":  # the host tier holds every expert: nothing is read from disk at run time
            assert run["disk_bytes_per_token"] == 0
    assert runs[100, "host"]["hit_rate"] == 1 and runs[100, "host"]["bytes_per_token"] == 0
    assert runs[100, "host"]["efficiency"] == pytest.approx(1.0)
    assert runs[0, "host"]["hit_rate"] == 0 and runs[0, "host"]["host_bytes_per_token"] > 0
    assert runs[25, "disk"]["disk_bytes_per_token"] > 0 and runs[25, "disk"]["host_bytes_per_token"] == 0
    assert runs[25, "disk"]["efficiency"] > 0  # disk bandwidth is measured on the CPU too
    assert runs[25, "host"]["efficiency"] is None  # needs the pinned H2D bandwidth: CUDA only


def test_baselines_and_targets(tiny_report):
    report, _ = tiny_report
    baselines = report["baselines"]
    assert baselines["transformers_grouped_mm_tok_s"] > 0
    assert baselines["transformers"]["experts_implementation"] == "grouped_mm"
    assert baselines["accelerate_tok_s"] is None and "skipped" in baselines["accelerate"]["error"]
    names = {t["target"] for t in report["targets"]}
    assert {"ratio100_decode_tok_s", "ratio100_prefill_tok_s", "efficiency_ratio50_host", "efficiency_ratio25_disk",
            "ratio25_prefill_tok_s", "ratio25_decode_vs_accelerate", "peak_memory_ratio25_host"} <= names
    for target in report["targets"]:
        assert target["met"] in (True, False, None)


def test_split_run_merges(tiny_report):
    """A second call that measures one ratio again keeps the first call's other runs, bandwidths and baselines."""
    report, root = tiny_report
    out = str(root / "merged.json")
    _run("--model-dir", str(root / "model"), "--phases", "ours", "--ratios", "50", "--disk-ratios", "",
         "--merge", str(root / "report.json"), "--out", out)
    with open(out) as handle:
        merged = json.load(handle)
    assert [(r["ratio"], r["tier"]) for r in merged["runs"]].count((50, "host")) == 1
    assert len(merged["runs"]) == len(report["runs"])
    assert merged["baselines"]["transformers_grouped_mm_tok_s"] == report["baselines"]["transformers_grouped_mm_tok_s"]
    assert merged["bandwidth"]["disk_odirect_gb_s"] == report["bandwidth"]["disk_odirect_gb_s"]
    assert "gen" not in merged["args"]["phases"]


def test_derived_figures_by_hand():
    bench = bench_module("h200_offload_bench")
    model = {"non_expert_bytes": 1_700_000_000, "input_embedding_bytes": 600_000_000, "config": {"hidden_size": 1000},
             "experts_per_token": 8, "moe_layers": 12, "expert_bytes": 10_000_000}
    run = dict(kernel="torch", peak_device_bytes=None, expected_device_bytes=None)
    report = {
        "bandwidth": {"h2d_pinned_9mb_gb_s": 50.0, "h2d_pinned_1gb_gb_s": 55.0, "disk_odirect_gb_s": 1.0,
                      "disk_odirect_parallel_gb_s": 2.0, "d2d_copy_gb_s": 4000.0},
        "model": model,
        "baselines": {"accelerate_tok_s": 0.5},
        "runs": [
            dict(run, ratio=100, tier="host", decode_tok_s=500.0, prefill_tok_s=12000.0, host_bytes_per_token=0,
                 disk_bytes_per_token=0),
            dict(run, ratio=25, tier="host", decode_tok_s=60.0, prefill_tok_s=300.0, host_bytes_per_token=550e6,
                 disk_bytes_per_token=0, peak_device_bytes=5.4e9, expected_device_bytes=5.0e9),
            dict(run, ratio=25, tier="disk", decode_tok_s=10.0, prefill_tok_s=30.0, host_bytes_per_token=0,
                 disk_bytes_per_token=100e6),
        ],
    }
    bench.derive(report)
    floor = 1_700_000_000 - 600_000_000 + 2000 + 8 * 12 * 10_000_000
    assert report["hbm_floor_bytes_per_token"] == floor
    assert report["hbm_floor_s_per_token"] == pytest.approx(floor / 4000e9)
    r100, r25, disk = report["runs"]
    assert r100["efficiency"] == pytest.approx(1.0)
    assert r25["efficiency"] == pytest.approx((550e6 / 55e9 + 1 / 500) * 60)  # best H2D: 55 GB/s
    assert disk["efficiency"] == pytest.approx((100e6 / 2e9 + 1 / 500) * 10)  # best disk: 2 GB/s
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["ratio100_decode_tok_s"] is False and met["ratio100_prefill_tok_s"] is True
    assert met["efficiency_ratio25_host"] is False and met["efficiency_ratio50_host"] is None
    assert met["ratio25_prefill_tok_s"] is False and met["ratio25_decode_vs_accelerate"] is True  # 120x
    assert met["peak_memory_ratio25_host"] is True  # 5.4 / 5.0 = 1.08
