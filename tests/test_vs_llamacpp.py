"""bench/vs_llamacpp.py (issue 6's side-by-side run): our side's whole flow on the CPU, and the row arithmetic.

The llama.cpp side needs a llama-bench build (bench/llamacpp/build.sh), which CI does not have; it is exercised
by feeding build_rows the rows run_llama_bench returns.
"""

from __future__ import annotations

import json

from repo_scripts import bench_module, run_bench


def _module():
    return bench_module("vs_llamacpp")


def test_ours_side_on_the_tiny_model(tmp_path):
    out = tmp_path / "vs.json"
    done = run_bench("vs_llamacpp", "--tiny", "--model-dir", str(tmp_path / "model"), "--ratios", "0,50", "--gen", "3",
                     "--repeats", "1", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["ratio"], r["ncmoe"]) for r in report["rows"]] == [(0, 2), (50, 1)]  # the tiny model has 2 layers
    for row in report["rows"]:
        assert row["ours_decode_tok_s"] > 0 and row["ours_prefill_tok_s"] > 0
        assert row["llamacpp_decode_tok_s"] is None and row["targets_met"]["decode"] is None
        # the main variant's numbers are the row's
        assert set(row["ours_by_variant"]) == {"hybrid", "hybrid_static", "gpu_only"}
        assert row["ours_by_variant"]["hybrid"]["decode_tok_s"] == row["ours_decode_tok_s"]
    assert report["main_variant"] == "hybrid" and report["decode_tokens"] == "random"  # as llama-bench's tg
    assert report["machine"] and report["versions"]["torch"]


def test_rows_pair_ratios_with_ncmoe_and_check_targets():
    vs = _module()
    assert [vs.ncmoe_for(r, 12) for r in (0, 25, 50, 75)] == [12, 9, 6, 3]
    ours = {0: {"decode_tok_s": 90.0, "prefill_tok_s": 400.0, "peak_device_bytes": 2e9},
            25: {"decode_tok_s": 100.0, "prefill_tok_s": 300.0, "peak_device_bytes": 6e9}}
    llamacpp = {12: {"decode_tok_s": 73.1, "prefill_tok_s": 121.0, "peak_device_bytes": 3e9},
                9: {"decode_tok_s": 97.1, "prefill_tok_s": 128.0, "peak_device_bytes": 5e9}}
    rows = {r["ratio"]: r for r in vs.build_rows(ours, llamacpp, 12)}
    assert rows[0]["targets_met"] == {"decode": True, "prefill": True, "memory": True}  # 1.23x, 3.3x, less memory
    assert rows[25]["targets_met"] == {"decode": False, "prefill": False, "memory": False}  # 1.03x, 2.3x, more
    assert abs(rows[25]["decode_vs_llamacpp"] - 100.0 / 97.1) < 1e-12


def _run_llama_bench():
    return bench_module("llamacpp.run_llama_bench")


class _FakeNvml:
    """NVML's three calls the memory poller makes, on two GPUs using 1,000 and 2,000 bytes; `fail` errs one."""

    def __init__(self, fail: str = ""):
        self.fail = fail

    def nvmlDeviceGetCount_v2(self, count):
        count._obj.value = 2
        return int(self.fail == "count")

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = index + 1
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle, memory):
        memory._obj.used = handle.value * 1000
        return int(self.fail == "memory")


def test_nvml_memory_reading_sums_the_gpus_or_reads_one():
    module = _run_llama_bench()
    assert module._nvml_used_bytes(_FakeNvml(), None) == 3000
    assert module._nvml_used_bytes(_FakeNvml(), "1") == 2000
    assert module._nvml_used_bytes(_FakeNvml("memory"), None) is None
    assert module._nvml_used_bytes(_FakeNvml("count"), "0") is None
    if module._nvml() is None:  # a machine without the NVIDIA driver, as CI: nvidia-smi or nothing
        assert module.memory_source() in ("nvidia-smi", None)
