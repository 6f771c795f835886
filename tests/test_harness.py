"""bench/harness.py, the one harness behind every GPU table: its whole flow on the CPU (--tiny), llama.cpp's side
through a stand-in llama-bench that prints output recorded on the H200, the row builders and the roofline on
numbers worked by hand, resuming a cut-short report, the table rendered from the report with no number of its
own, and the quantized weights (issue 17): the model quantized by `moe-offload quantize` once, and the combined
table's ratios to bf16 and targets on runs scaled by hand.

The GPU run is expensive and unattended, so everything but the CUDA-only measurements (pinned copies, NVML peaks,
graphs) is exercised here; llama-bench itself needs a build (bench/llamacpp/build.sh), which CI does not have.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import statistics
import sys

import pytest
import torch
from repo_scripts import ROOT, bench_module, run_bench

RECORDED = os.path.join(ROOT, "bench", "results", "archive", "2026-11-29-h200-vs-llamacpp.json")
STAND_IN = """#!{python}
# llama-bench as recorded on the H200 (bench/results/archive/2026-11-29-h200-vs-llamacpp.json): the tiny model's
# -ncmoe 2 and 1 answer with the recorded -ncmoe 12 and 6 output
import json, sys
ncmoe = int(sys.argv[sys.argv.index("-ncmoe") + 1])
print(json.dumps(json.load(open({recorded!r}))["llamacpp"][{{2: "12", 1: "6"}}[ncmoe]]["raw"]))
"""
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
SIDE_BY_SIDE_FIELDS = ("ratio", "ncmoe", "ours_decode_tok_s", "llamacpp_decode_tok_s", "ours_prefill_tok_s",
                       "llamacpp_prefill_tok_s", "decode_vs_llamacpp", "prefill_vs_llamacpp", "targets_met",
                       "variant", "ours_prefill_first_tok_s", "ours_peak_device_bytes", "llamacpp_peak_device_bytes",
                       "ours_decode_tok_s_min", "ours_decode_tok_s_max", "llamacpp_decode_tok_s_min",
                       "llamacpp_decode_tok_s_max", "ours_prefill_first_tok_s_min", "ours_prefill_tok_s_max")


def _harness(*args: str) -> None:
    done = run_bench("harness", "--tiny", *args, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _harness_here(*args: str) -> int:
    """The harness's driver in this process (its workers are processes still): no second interpreter to start."""
    harness = bench_module("harness")
    return harness.Harness(harness.parse_args(["--tiny", *args])).run()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny call of both tables, llama.cpp's side answered by the stand-in: (report, folder)."""
    root = tmp_path_factory.mktemp("harness")
    binary = root / "llama-bench"
    binary.write_text(STAND_IN.format(python=sys.executable, recorded=RECORDED))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF")  # the stand-in never opens it
    sweep = root / "sweep.json"  # what run_llama_bench's sweep writes: the best flags and every run
    sweep.write_text(json.dumps({"llamacpp_flags": "-t 16", "sweep": [{"flags": "-t 16", "decode_tok_s": 9.0}]}))
    _harness("--model-dir", str(root / "model"), "--gguf", str(gguf), "--llama-bench", str(binary),
             "--llamacpp-sweep", str(sweep), "--offload-ratios", "50,0", "--out", str(root / "report.json"))
    return json.loads((root / "report.json").read_text()), root


def test_the_report_says_what_was_measured_with(tiny):
    report, _ = tiny
    assert report["schema"] == "moe-offload/harness/1" and report["mode"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{40}", report["commit"]) and isinstance(report["dirty"], bool)
    assert re.fullmatch(r"[0-9a-f]{16}", report["source_digest"])
    assert report["machine"]["cpu_count"] and {"torch", "transformers", "accelerate"} <= set(report["versions"])
    assert report["llamacpp_flags"]["flags"] == ["-t", "16"] and report["llamacpp_flags"]["swept"] is True
    assert report["llamacpp_flags"]["sweep"] == [{"flags": "-t 16", "decode_tok_s": 9.0}]
    call = report["calls"][0]
    assert call["commit"] == report["commit"] and call["args"]["repeats"] == 3
    assert call["bandwidth"]["dram_read_gb_s"] > 0 and call["bandwidth"]["disk_odirect_gb_s"] > 0
    assert "h2d_pinned_9mb_gb_s" not in call["bandwidth"]  # CUDA only


def test_the_default_variant_is_the_ratio_alone(tiny):
    report, _ = tiny
    for run in report["runs"]:
        assert "error" not in run, run.get("error")
        extra = {} if run["variant"] == "default" else {"MOE_HOST_CACHE": 0}
        assert run["properties"] == {"MOE_OFFLOAD_RATIO": run["ratio"], **extra}
        assert run["config"]["moe_offload_ratio"] == run["ratio"]  # the resolved config, every field
        assert {c["name"] for c in run["choices"]} >= {"MOE_HOST_CACHE", "MOE_CPU_EXPERTS"}
    assert {(r["variant"], r["ratio"]) for r in report["runs"]} == {("default", 0), ("default", 50), ("disk", 50)}


def test_first_seen_prefills_then_replays(tiny):
    report, _ = tiny
    run = next(r for r in report["runs"] if (r["variant"], r["ratio"]) == ("default", 50))
    assert [g["prompt_tokens"] for g in run["cold"]] == [16, 17]
    assert [g["prompt_tokens"] for g in run["first_seen"]] == [32, 33, 34]  # lengths never run before
    assert [g["prompt_tokens"] for g in run["second_seen"]] == [32, 33, 34]
    assert [(g["prompt_tokens"], g["new_tokens"], g["decode_steps"]) for g in run["replayed"]] == [(32, 8, 7)] * 3
    assert all("hits" in g["prefill"] for g in run["second_seen"])  # prefill counters read outside the timings
    assert all(set(g["prefill"]) == {"graph"} for g in run["replayed"])


def test_workload_draws_fresh_tokens_and_no_eos():
    worker = bench_module("worker")
    one = worker.RandomWorkload(vocab=64, avoid=[5], seed=0)
    first, second = one.feed(200), one.feed(200)
    assert not torch.equal(first, second)  # a new draw every repeat
    assert torch.equal(first, worker.RandomWorkload(64, [5], 0).feed(200))  # reproducible from the seed
    assert int(first.min()) >= 2 and not (torch.cat([first, second]) == 5).any()
    assert one.prompt(7).shape == (1, 7)


def test_side_by_side_rows_interleave_and_use_llama_bench_samples(tiny):
    report, _ = tiny
    rows = {r["ratio"]: r for r in report["rows"]}
    assert set(rows) == {0, 50} and all(set(SIDE_BY_SIDE_FIELDS) <= set(r) for r in rows.values())
    assert (rows[0]["ncmoe"], rows[50]["ncmoe"]) == (2, 1)  # the tiny model has 2 layers
    assert (rows[0]["first"], rows[50]["first"]) == ("ours", "llamacpp")  # alternating
    recorded = json.load(open(RECORDED))["llamacpp"]
    for ratio, ncmoe in ((0, "12"), (50, "6")):
        decode = next(e for e in recorded[ncmoe]["raw"] if e["n_gen"])["samples_ts"]
        assert rows[ratio]["llamacpp_decode_tok_s"] == statistics.median(decode)  # a median, not avg_ts
        assert (rows[ratio]["llamacpp_decode_tok_s_min"], rows[ratio]["llamacpp_decode_tok_s_max"]) == (
            min(decode), max(decode))
        row = rows[ratio]
        assert row["decode_vs_llamacpp"] == row["ours_decode_tok_s"] / row["llamacpp_decode_tok_s"]
        assert row["prefill_vs_llamacpp"] == row["ours_prefill_first_tok_s"] / row["llamacpp_prefill_tok_s"]
        assert row["variant"] == "default" and "tiny random model" in row["routing"]
        assert row["targets_met"]["memory"] is None  # no NVML on this machine: no peak on either side


def test_offload_rows_and_baselines(tiny):
    report, _ = tiny
    rows = {(r["tier"], r["ratio"]): r for r in report["offload_rows"]}
    assert set(rows) == {("host", 50), ("host", 0), ("disk", 50)}
    assert rows["host", 0]["hit_rate"] == 0 and rows["host", 0]["pcie_bytes_per_token"] > 0
    assert rows["host", 0]["efficiency"] is None and "not measured" in rows["host", 0]["bound"]  # no pinned H2D
    paired = next(r for r in report["rows"] if r["ratio"] == 50)  # both tables from the one measurement
    assert rows["host", 50]["decode_tok_s"] == paired["ours_decode_tok_s"] and paired["ours_decode_tok_s"] > 0
    disk = rows["disk", 50]
    assert disk["disk_bytes_per_token"] > 0 and disk["pcie_bytes_per_token"] == 0
    assert disk["bound"].startswith("disk") and disk["efficiency"] > 0
    baseline = report["baseline_rows"]["transformers"]
    assert baseline["repeats"] == 3 and baseline["decode_tok_s_min"] <= baseline["decode_tok_s"]
    assert report["baselines"]["transformers"]["warm_up"]["new_tokens"] == 2
    assert "accelerate" not in report["baselines"]  # CUDA only


def test_merge_resumes_only_what_is_missing(tiny, tmp_path):
    report, root = tiny
    out = tmp_path / "merged.json"
    assert _harness_here("--model-dir", str(root / "model"), "--merge", str(root / "report.json"), "--tables",
                         "offload", "--offload-ratios", "100,50", "--disk-ratios", "", "--phases", "runs",
                         "--out", str(out)) == 0
    merged = json.loads(out.read_text())
    assert len(merged["calls"]) == 2
    new = [(r["variant"], r["ratio"]) for r in merged["runs"] if r["call"] == 1]
    assert new == [("default", 100)]  # ratio 50 was measured already, in the side by side
    assert merged["offload"]["ratios"] == [0, 50, 100] and merged["rows"] == report["rows"]
    r100 = next(r for r in merged["offload_rows"] if r["ratio"] == 100)
    assert r100["hit_rate"] == 1 and r100["bound"] == "nothing offloaded"
    short = tmp_path / "short.json"
    assert _harness_here("--model-dir", str(root / "model"), "--merge", str(out), "--tables", "offload",
                         "--offload-ratios", "75", "--disk-ratios", "", "--phases", "runs", "--budget-s", "0",
                         "--out", str(short)) == 1
    assert [r.get("error") for r in json.loads(short.read_text())["runs"] if r["ratio"] == 75] == [
        "skipped: time budget"]


def test_a_call_without_time_keeps_what_an_earlier_call_measured(tiny, tmp_path):
    """A side-by-side ratio with a variant missing reruns the ratio's pairs back to back; a call with no time left
    for them skips the new variant and keeps the earlier call's measurements instead of replacing them by skips."""
    report, root = tiny
    out = tmp_path / "kept.json"
    assert _harness_here("--model-dir", str(root / "model"), "--merge", str(root / "report.json"), "--tables",
                         "side_by_side", "--ratios", "50", "--variants", '{"lfru": {"MOE_CACHE_POLICY": "lfru"}}',
                         "--phases", "runs", "--budget-s", "0", "--out", str(out)) == 1
    merged = json.loads(out.read_text())
    runs = {(r["variant"], r["ratio"]): r for r in merged["runs"]}
    earlier = next(r for r in report["runs"] if (r["variant"], r["ratio"]) == ("default", 50))
    assert runs["default", 50] == earlier and runs["lfru", 50]["error"] == "skipped: time budget"
    assert merged["llamacpp"] == report["llamacpp"]


def test_roofline_by_hand():
    derive = bench_module("derive")
    bandwidth = {"h2d_pinned_9mb_gb_s": 50.0, "h2d_pinned_1gb_gb_s": 55.0, "dram_read_gb_s": 100.0,
                 "disk_odirect_gb_s": 1.0, "disk_odirect_parallel_gb_s": 2.0}
    host = derive.roofline({"pcie": 500e6, "cpu": 0, "disk": 0}, 100.0, bandwidth)
    assert host["bound"] == "PCIe (pinned H2D)" and host["bound_gb_s"] == 55.0  # the best of the two copies
    assert host["efficiency"] == pytest.approx(50 / 55)
    hybrid = derive.roofline({"pcie": 400e6, "cpu": 300e6, "disk": 0}, 100.0, bandwidth)
    assert hybrid["bound_gb_s"] == 155.0 and hybrid["efficiency"] == pytest.approx(70 / 155)
    disk = derive.roofline({"pcie": 0, "cpu": 0, "disk": 100e6}, 10.0, bandwidth)
    assert disk["bound_gb_s"] == 2.0 and disk["efficiency"] == pytest.approx(0.5)
    assert derive.roofline({"pcie": 0, "cpu": 0, "disk": 0}, 500.0, bandwidth)["bound"] == "nothing offloaded"
    assert derive.roofline({"pcie": 1, "cpu": 0, "disk": 1}, 5.0, bandwidth)["efficiency"] is None
    no_dram = derive.roofline({"pcie": 1e6, "cpu": 1e6, "disk": 0}, 5.0, {"h2d_pinned_1gb_gb_s": 50.0})
    assert no_dram["efficiency"] is None and "not measured" in no_dram["bound"]


def _generation(prompt: int, tok_s: float, prefill_tok_s: float) -> dict:
    return {"prompt_tokens": prompt, "decode_tok_s": tok_s, "prefill_tok_s": prefill_tok_s, "decode_steps": 31,
            "ttft_s": 0.1, "prefill": {"graph": True}, "decode": {"hits": 1, "misses": 1, "hit_rate": 0.5,
                                                                  "host_bytes": 0, "disk_bytes": 0,
                                                                  "in_place_bytes": 31e8, "cpu_experts": 0}}


def test_rows_pair_ratios_with_ncmoe_and_check_targets():
    derive = bench_module("derive")
    assert [derive.ncmoe_for(r, 12) for r in (0, 25, 50, 75)] == [12, 9, 6, 3]

    def run(ratio, decode, first_seen, peak, sequence):
        return {"variant": "default", "ratio": ratio, "expert_bytes": 1, "call": 0, "sequence": sequence,
                "peak_device_bytes": peak, "first_seen": [_generation(128, None, first_seen)] * 3,
                "replayed": [_generation(128, decode, 2 * first_seen)] * 3, "second_seen": []}

    def peer(ncmoe, decode, prefill, peak, sequence):
        return {"ncmoe": ncmoe, "call": 0, "sequence": sequence, "peak_device_bytes": peak,
                "decode_tok_s": {"median": decode, "min": decode, "max": decode},
                "prefill_tok_s": {"median": prefill, "min": prefill, "max": prefill}}

    report = {"model": {"moe_layers": 12}, "side_by_side": {"ratios": [0, 25], "variants": ["default"]},
              "calls": [{"bandwidth": {}}], "routing": "by hand", "runs": [run(0, 90.0, 400.0, 2e9, 1),
                                                                          run(25, 100.0, 300.0, 6e9, 4)],
              "llamacpp": [peer(12, 73.1, 121.0, 3e9, 2), peer(9, 97.1, 128.0, 5e9, 3)]}
    rows = {r["ratio"]: r for r in derive.side_by_side_rows(report)}
    assert rows[0]["targets_met"] == {"decode": True, "prefill": True, "memory": True}  # 1.23x, 3.3x, less memory
    assert rows[25]["targets_met"] == {"decode": False, "prefill": False, "memory": False}  # 1.03x, 2.3x, more
    assert rows[25]["prefill_replayed_vs_llamacpp"] == pytest.approx(600 / 128)  # replayed passes, not judged
    assert (rows[0]["first"], rows[25]["first"]) == ("ours", "llamacpp")


def _allowed_numbers(value, formats) -> set[str]:
    """Every number a FORMATS rendering of a numeric leaf of `value` prints, and every number inside its strings."""
    found: set[str] = set()
    if isinstance(value, bool) or value is None:
        return found
    if isinstance(value, (int, float)):
        for render in formats.values():
            found.update(NUMBER.findall(render(value)))
    elif isinstance(value, str):
        found.update(NUMBER.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            found |= _allowed_numbers(item, formats)
    elif isinstance(value, list):
        for item in value:
            found |= _allowed_numbers(item, formats)
    return found


def test_table_numbers_all_come_from_the_report(tiny):
    table = bench_module("table")
    report, _ = tiny
    text = table.render(report, "REPORT")
    row = report["rows"][0]
    for value, kind in ((row["ours_decode_tok_s"], "tok_s"), (row["llamacpp_decode_tok_s"], "tok_s"),
                        (row["ours_prefill_first_tok_s"], "tok_s"), (row["decode_vs_llamacpp"], "x")):
        assert table.fig(value, kind) in text
    prose = re.sub(r"`[^`]*`", "", text)  # code spans (a commit hash, a digest, a command) are not figures
    invented = set(NUMBER.findall(prose)) - _allowed_numbers(report, table.FORMATS)
    assert not invented, f"numbers in the table that no field of the report gives: {sorted(invented)}"
    report["rows"][0]["ours_decode_tok_s"] = 123456.0  # the check sees a number the file does not hold
    assert "123,456" in table.render(report, "REPORT")


def test_table_write_replaces_only_between_markers(tiny, tmp_path):
    table = bench_module("table")
    _, root = tiny
    target = tmp_path / "RESULTS.md"
    target.write_text(f"# head\n{table.BEGIN}\npending\n{table.END}\n## tail\n")
    assert table.main([str(root / "report.json"), "--write", str(target)]) == 0
    text = target.read_text()
    assert text.startswith(f"# head\n{table.BEGIN}\nRendered by") and text.endswith(f"{table.END}\n## tail\n")
    assert "pending" not in text and "### Side by side with llama.cpp" in text and "### Offload table" in text
    assert table.main([str(root / "report.json"), "--write", str(target)]) == 0 and target.read_text() == text
    target.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one"):
        table.main([str(root / "report.json"), "--write", str(target)])


def test_results_md_has_the_markers_once():
    text = open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8").read()
    table = bench_module("table")
    assert text.count(table.BEGIN) == 1 and text.count(table.END) == 1
    assert "python -m bench.table" in text


def test_quant_phase_writes_each_checkpoint_once(tiny, tmp_path):
    """The tiny flow's quant step for real: `moe-offload quantize` in its own process, timed with its peak RSS, into
    MODEL-int4; a second call finds it there. A folder in its place that the harness did not write is refused."""
    _, root = tiny
    out = tmp_path / "quant.json"
    args = ["--model-dir", str(root / "model"), "--weights", "int4", "--phases", "quant", "--out", str(out)]
    assert _harness_here(*args) == 0
    report = json.loads(out.read_text())
    done = report["calls"][0]["quantization"]["int4"]
    assert done["quantized"] and done["seconds"] > 0 and done["peak_rss_bytes"] > 0 and "4 bits" in done["summary"]
    assert report["quantization"] == {"method": "rtn", "group_size": 32} and report["weights"] == ["int4"]
    config = json.loads((root / "model-int4" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert report["models"]["int4"]["expert_bytes"] < json.loads(
        (root / "report.json").read_text())["model"]["expert_bytes"] / 3
    assert _harness_here(*args, "--merge", str(out)) == 0
    assert json.loads(out.read_text())["calls"][1]["quantization"]["int4"] == {"quantized": False, "seconds": 0.0}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    with pytest.raises(RuntimeError, match="not a quantized random model"):
        bench_module("common").quantize_model(str(root / "model"), str(foreign), 4, 32, "rtn")


def test_quant_phase_writes_the_fp8_checkpoint(tiny, tmp_path):
    """fp8: the tiny model written as Qwen3-30B-A3B-FP8 is (bench/fp8_checkpoint.py), in a process of its own:
    every decoder projection F8_E4M3 beside its float32 128 x 128 block scales (block max / 448), the router and
    the rest as they were, Qwen3-FP8's quantization_config; the engine loads and runs it, counting FP8 bytes."""
    from safetensors.torch import load_file

    from moe_offload import LLMPipeline

    _, root = tiny
    out = tmp_path / "fp8.json"
    assert _harness_here("--model-dir", str(root / "model"), "--weights", "fp8", "--phases", "quant",
                         "--out", str(out)) == 0
    report = json.loads(out.read_text())
    done = report["calls"][0]["quantization"]["fp8"]
    assert done["quantized"] and done["peak_rss_bytes"] > 0 and "to FP8 e4m3 (128 x 128 blocks" in done["summary"]
    path = root / "model-fp8"
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["fmt"], quant["weight_block_size"]) == ("fp8", "e4m3", [128, 128])
    source, written = {}, {}
    for folder, tensors in ((root / "model", source), (path, written)):
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    projections = [n for n in source if re.search(r"\.layers\.\d+\..*_proj\.weight$", n)]
    assert projections and set(written) == set(source) | {f"{n}_scale_inv" for n in projections}
    for name in projections:  # the tiny model's matrices are one block each
        weight, codes, scale = source[name].float(), written[name], written[f"{name}_scale_inv"]
        assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (1, 1)
        assert scale.item() == pytest.approx(weight.abs().max().item() / 448, rel=1e-6)
        restored = codes.float() * scale  # e4m3: 3 significant bits after the leading one
        assert ((restored - weight).abs() <= weight.abs() / 16 + scale * 2.0 ** -9).all()
    for name in set(source) - set(projections):
        assert torch.equal(written[name], source[name])
    pipe = LLMPipeline(str(path), "cpu", MOE_OFFLOAD_RATIO=50)
    try:
        assert pipe.get_offload_stats()["expert_bytes"] == report["models"]["fp8"]["expert_bytes"]
        prompt = torch.tensor([[5, 6, 7, 8]])
        assert pipe.generate_tokens(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (3,)
    finally:
        pipe.close()


def _as_int4(run: dict, byte_share: float, speedup: float) -> dict:
    """A copy of a bf16 run as if int4: expert bytes and every decode byte counter times byte_share, decode
    speed times speedup."""
    run = copy.deepcopy(run)
    run.update(weights="int4", expert_bytes=run["expert_bytes"] * byte_share)
    for generation in run["replayed"]:
        generation["decode_tok_s"] *= speedup
        for key in ("host_bytes", "disk_bytes", "in_place_bytes"):
            generation["decode"][key] *= byte_share
    return run


def test_quantized_table_sets_each_weights_beside_bf16(tiny):
    derive, table = bench_module("derive"), bench_module("table")
    report = copy.deepcopy(tiny[0])
    report["weights"] = ["bf16", "int4"]
    report["runs"] += [_as_int4(r, 0.25, 3.0) for r in report["runs"]]
    rows = {(r["weights"], r["tier"], r["ratio"]): r for r in derive.derive(report)["quant_rows"]}
    assert set(rows) == {(w, t, r) for w in ("bf16", "int4") for t, r in (("host", 50), ("host", 0), ("disk", 50))}
    int4 = rows["int4", "host", 0]
    assert int4["bytes_vs_bf16"] == pytest.approx(0.25) and int4["decode_vs_bf16"] == pytest.approx(3.0)
    assert (int4["gguf_type"], int4["ncmoe"]) == ("Q4_0", 2)  # no Q4_0 run in this report: no ratio to llama.cpp
    marks = {t["name"]: t["met"] for t in int4["targets"]}
    assert marks == {"bytes_vs_bf16": True, "decode_vs_bf16": True, "decode_vs_llamacpp": None,
                     "prefill_vs_llamacpp": None, "peak_vs_llamacpp": None}
    assert not rows["bf16", "host", 0]["targets"] and not rows["int4", "disk", 50]["targets"]  # host tier only
    judged = {t["target"]: t for t in report["targets"] if t["table"] == "quantized"}
    assert judged["int4_ratio0_bytes_vs_bf16"]["direction"] == "max" and judged["int4_ratio0_bytes_vs_bf16"]["met"]
    text = table.render(report, "REPORT")
    assert "### Quantized experts" in text and "| int4 | 0, host |" in text and "bytes_vs_bf16 <= 0.30: yes" in text
    prose = re.sub(r"`[^`]*`", "", text)
    assert not set(NUMBER.findall(prose)) - _allowed_numbers(report, table.FORMATS)


def test_reports_from_before_the_weights_render_as_bf16():
    table = bench_module("table")
    canonical = os.path.join(ROOT, "bench", "results", "2026-12-05-h100-harness.json")
    report = bench_module("derive").derive(json.load(open(canonical)))
    assert {r["weights"] for r in report["runs"] + report["llamacpp"]} == {"bf16"} and not report["quant_rows"]
    text = table.render(report, canonical)
    assert "| bf16 / BF16 | 0 / 12 |" in text and "### Quantized experts" not in text


def test_each_weights_has_its_gguf():
    harness = bench_module("harness")
    assert [harness.gguf_for("/m/full.gguf", w) for w in ("bf16", "int4", "int8", "fp8")] == [
        "/m/full.gguf", "/m/full-Q4_0.gguf", "/m/full-Q8_0.gguf", "/m/full-Q8_0.gguf"]
    swept = {"sweep": [{"command": "llama-bench -m /m/full-Q4_0.gguf -ngl 99 -t 4"}]}  # its flags serve every GGUF
    assert harness._swept_model(swept) == "full-Q4_0.gguf" and "not name" in harness._swept_model({})


@pytest.mark.parametrize("args, message", [
    (["--weights", "bf16,int3"], "unknown weights ['int3']"),
    (["--weights", "int4", "--gguf", os.path.join(ROOT, "README.md"), "--llama-bench", os.path.join(ROOT, "README.md")],
     "Q4_0 peer of --weights int4"),
    (["--repeats", "2"], "at least 3"),
    (["--variants", '{"default": {"MOE_CPU_EXPERTS": "off"}}'], "harness's own"),
    (["--variants", "[1]"], "JSON object"),
    (["--gguf", "x.gguf"], "go together"),
    (["--ratios", "0,abc"], "comma-separated integers"),
    (["--offload-ratios", "150"], "0-100"),
    (["--tables", "offload,other"], "unknown tables"),
])
def test_bad_arguments_fail_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit):
        bench_module("harness").parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_commit_from_git_or_the_environment(monkeypatch):
    provenance = bench_module("provenance")
    found = provenance.commit()
    assert found["commit_source"] == "git" and re.fullmatch(r"[0-9a-f]{40}", found["commit"])
    monkeypatch.setenv("MOE_BENCH_COMMIT", "abc123")
    monkeypatch.setenv("MOE_BENCH_DIRTY", "false")
    # said by whoever started the run, it wins over a .git that may be stale (a device machine's copy)
    assert provenance.commit() == {"commit": "abc123", "dirty": False, "commit_source": "environment"}
    monkeypatch.setattr(provenance, "_git", lambda *args: None)  # a tree copied without its .git
    assert provenance.commit() == {"commit": "abc123", "dirty": False, "commit_source": "environment"}
    monkeypatch.delenv("MOE_BENCH_COMMIT")
    assert provenance.commit()["commit"] is None
    assert provenance.source_digest() == provenance.source_digest()


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
    module = bench_module("llamacpp.run_llama_bench")
    assert module._nvml_used_bytes(_FakeNvml(), None) == 3000
    assert module._nvml_used_bytes(_FakeNvml(), "1") == 2000
    assert module._nvml_used_bytes(_FakeNvml("memory"), None) is None
    assert module._nvml_used_bytes(_FakeNvml("count"), "0") is None
    if module._nvml() is None:  # a machine without the NVIDIA driver, as CI: nvidia-smi or nothing
        assert module.memory_source() in ("nvidia-smi", None)
