"""bench/llamacpp/run_llama_bench.py: the parsers on outputs captured from llama.cpp b11549's CPU binaries
(tests/fixtures/llamacpp/, README.md there says how), median/min/max, the best-flag choice, the sweep and the
expert-cache runner end to end against stand-in binaries, and, where LLAMACPP_DIR names a build.sh DIR, the real ones.

The GPU-only log lines (pinned CUDA_Host buffers, the MoE cache's size and hit rates) cannot be captured on a CPU:
those tests feed lines written from the format strings in the llama.cpp sources (src/llama-model.cpp,
src/llama-moe-cache.cpp).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from repo_scripts import ROOT, bench_module

FIXTURES = Path(ROOT) / "tests" / "fixtures" / "llamacpp"


@pytest.fixture(scope="module")
def rb():
    return bench_module("llamacpp.run_llama_bench")


def test_spread_is_median_min_max(rb):
    assert rb.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert rb.spread([4, 1, 2, 3])["median"] == 2.5
    assert rb.spread([]) is None


def test_llama_bench_json_gives_the_median_of_its_repeats(rb):
    parsed = rb.parse_bench_json(json.loads((FIXTURES / "llama-bench.json").read_text()))
    # decode repeats 2.69, 4.29, 6949 tok/s (two stalled on a busy machine): the median is the middle one
    assert parsed["decode"] == {"median": 4.29321, "min": 2.68819, "max": 6949.39, "n": 3}
    assert parsed["prefill"] == {"median": 28.572, "min": 27.9727, "max": 29.1983, "n": 3}
    assert parsed["build"]["build_commit"] == "b11549" and parsed["build"]["backends"] == "CPU"
    assert rb.parse_bench_json([]) == {"prefill": None, "decode": None, "build": dict.fromkeys(parsed["build"])}


def test_batched_bench_jsonl_drops_the_cold_entry_and_ignores_log_lines(rb):
    text = (FIXTURES / "batched-bench.jsonl").read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    parsed = rb.parse_batched_bench(text, repeats=3)
    assert parsed["results"] == entries[1:]
    assert rb.parse_batched_bench(text, repeats=2)["results"] == entries[1:3]  # a trailing entry is not counted
    decode = sorted(e["speed_tg"] for e in entries[1:])
    assert parsed["decode"] == {"median": decode[1], "min": decode[0], "max": decode[2], "n": 3}
    assert parsed["prefill"]["n"] == 3 and parsed["prefill"]["median"] > entries[0]["speed_pp"]
    # the same entries among the log's lines, one glued to a log line, read the same
    log, lines = (FIXTURES / "batched-bench.stderr.txt").read_text().splitlines(), text.splitlines()
    mixed = "\n".join(log[:5] + lines[:1] + log[5:9] + ["..." + lines[1]] + lines[2:] + log[9:])
    assert rb.parse_batched_bench(mixed, repeats=3) == parsed
    assert rb.parse_batched_bench("no results here", repeats=3)["decode"] is None


def test_llama_bench_log_shows_the_mmap_warning_and_pageable_buffers(rb):
    facts = rb.log_facts((FIXTURES / "llama-bench-mmap.stderr.txt").read_text())
    assert facts["load_mode"] == "mmap" and facts["model_buffers_mib"] == {"CPU_Mapped": 0.56}
    assert facts["warnings"] == 1 and "consider using --load-mode none" in facts["warning_lines"][0]
    assert facts["moe_cache"] is None


def test_batched_bench_log_levels_mark_its_warnings_and_errors(rb):
    facts = rb.log_facts((FIXTURES / "batched-bench.stderr.txt").read_text())
    assert facts["load_mode"] == "none" and facts["model_buffers_mib"] == {"CPU": 0.56}
    assert facts["warnings"] == 4  # three "warning:" lines (no GPU) and one W line (the tiny vocab's eos)
    assert any(" W load: special_eos_id" in line for line in facts["warning_lines"])
    failed = rb.log_facts((FIXTURES / "batched-bench-cache-cpu.stderr.txt").read_text())
    assert any(line.endswith("MoE cache requires a GPU backend") for line in failed["warning_lines"])


def test_gpu_log_lines_give_pinned_buffers_and_cache_hit_rates(rb):
    # written from the format strings of src/llama-model.cpp and src/llama-moe-cache.cpp (no GPU here)
    text = "\n".join([
        "0.00.812.001 I load_tensors: loading model tensors, this can take a while... (load_mode = none)",
        "0.00.900.001 I load_tensors:        CUDA0 model buffer size =  9000.50 MiB",
        "0.00.900.002 I load_tensors:    CUDA_Host model buffer size =  7000.25 MiB",
        "0.01.000.003 I llama_moe_cache:      CUDA0 MoE cache size =  4096.00 MiB for 6912.00 MiB of host experts",
        "0.01.000.004 I llama_moe_cache:  6 layers, bf16:   606 slots (78.9%)",
        "0.09.000.005 I llama_moe_cache: ubatch <= 8: hits = 7000, misses = 3000, hit rate = 70.00%, "
        "uploaded = 2700.00 MiB",
        "0.09.000.006 I llama_moe_cache: ubatch  > 8: hits = 10, misses = 20, hit rate = 33.33%, uploaded = 18.00 MiB",
        "0.00.950.007 W llama_moe_cache: MoE cache budget is too small for 2 layers, they are not cached",
    ])
    facts = rb.log_facts(text)
    assert facts["load_mode"] == "none"
    assert facts["model_buffers_mib"] == {"CUDA0": 9000.5, "CUDA_Host": 7000.25}
    assert facts["moe_cache"]["buffers"] == {"CUDA0": {"mib": 4096.0, "host_experts_mib": 6912.0}}
    assert facts["moe_cache"]["stats"]["ubatch <= 8"] == {"hits": 7000, "misses": 3000, "hit_rate": 0.7,
                                                         "uploaded_mib": 2700.0}
    assert set(facts["moe_cache"]["stats"]) == {"ubatch <= 8", "ubatch  > 8"}
    assert facts["warnings"] == 1


def test_best_takes_the_fastest_median_decode_of_the_runs_that_finished(rb):
    rows = [{"flags": "a", "returncode": 0, "decode_tok_s": 50.0, "prefill_tok_s": 100.0},
            {"flags": "b", "returncode": 0, "decode_tok_s": 60.0, "prefill_tok_s": 90.0},
            {"flags": "c", "returncode": 0, "decode_tok_s": 60.0, "prefill_tok_s": 95.0},
            {"flags": "d", "returncode": 1, "decode_tok_s": 99.0, "prefill_tok_s": 99.0},
            {"flags": "e", "returncode": 0, "decode_tok_s": None, "prefill_tok_s": 500.0}]
    assert rb.best(rows)["flags"] == "c"  # b and c tie on decode; c prefills faster
    assert rb.best(rows[3:]) is None
    assert rb.flags_string(16, 1, "none") == "-t 16 -fa 1 -lm none"


# A stand-in llama-bench: the captured JSON with its samples scaled by the flags (16 threads, -fa 1 and -lm none
# fastest), one stderr line saying which flags it got and a warning under -lm mmap; exit 1 for -ncmoe 99.
FAKE_LLAMA_BENCH = """
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
if value("-ncmoe") == "99":
    print("error: failed to load model", file=sys.stderr)
    sys.exit(1)
scale = int(value("-t")) + 10 * int(value("-fa")) + (5 if value("-lm") == "none" else 0)
print("load_tensors: loading model tensors, this can take a while... (load_mode = %s)" % value("-lm"), file=sys.stderr)
if value("-lm") == "mmap":
    print("llama_model_loader: tensor overrides to CPU are used with mmap enabled - consider using --load-mode none",
          file=sys.stderr)
tests = json.load(open(FIXTURE))
for test in tests:
    test["samples_ts"] = [s * scale for s in test["samples_ts"]][: int(value("-r"))]
print(json.dumps(tests))
"""

# A stand-in llama-batched-bench: the captured JSONL (one entry per -npp value) and stderr.
FAKE_BATCHED_BENCH = """
import sys
args = sys.argv[1:]
entries = open(FIXTURE).read().splitlines()
n = len(args[args.index("-npp") + 1].split(","))
print("\\n".join((entries * n)[:n]))
sys.stderr.write(open(STDERR).read())
"""


def _fake(tmp_path: Path, name: str, body: str, **constants) -> str:
    path = tmp_path / name
    header = "".join(f"{key} = {str(value)!r}\n" for key, value in constants.items())
    path.write_text(f"#!{sys.executable}\n{header}{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_sweep_picks_the_best_flags_and_tuned_uses_them_at_every_ncmoe(rb, tmp_path):
    bench = _fake(tmp_path, "llama-bench", FAKE_LLAMA_BENCH, FIXTURE=FIXTURES / "llama-bench.json")
    logs = tmp_path / "logs"
    report = rb.tuned(bench, "model.gguf", [0, 6], sweep_ncmoe=3, threads=(8, 16), log=lambda line: None,
                      log_dir=str(logs), repeats=3)
    assert report["llamacpp_flags"] == "-t 16 -fa 1 -lm none"
    assert [row["flags"] for row in report["sweep"]] == [
        f"-t {t} -fa {fa} -lm {lm}" for t in (8, 16) for fa in (0, 1) for lm in ("mmap", "none")]
    assert {row["ncmoe"] for row in report["sweep"]} == {3}
    assert [(row["ncmoe"], row["flags"]) for row in report["rows"]] == [(0, report["llamacpp_flags"]),
                                                                       (6, report["llamacpp_flags"])]
    row = report["rows"][0]
    assert row["decode_tok_s"] == pytest.approx(4.29321 * 31) and row["decode_tok_s_max"] == pytest.approx(6949.39 * 31)
    assert row["repeats"] == 3 and row["returncode"] == 0 and row["build"]["build_commit"] == "b11549"
    assert row["load_mode"] == "none" and row["warnings"] == 0
    assert "-v" in row["command"].split() and row["command"].endswith("-t 16 -fa 1 -lm none")
    mmap_row = next(r for r in report["sweep"] if r["flags"].endswith("mmap"))
    assert mmap_row["warnings"] == 1
    for each in report["sweep"] + report["rows"]:  # every run's stderr kept, after its command line
        text = Path(each["log"]).read_text()
        assert Path(each["log"]).parent == logs and text.startswith(each["command"]) and "load_mode" in text
    assert len({each["log"] for each in report["sweep"] + report["rows"]}) == 10


def test_a_failed_run_keeps_its_error_and_a_sweep_with_none_raises(rb, tmp_path):
    bench = _fake(tmp_path, "llama-bench", FAKE_LLAMA_BENCH, FIXTURE=FIXTURES / "llama-bench.json")
    row = rb.run_one(bench, "model.gguf", 99, flags="-t 4 -fa 1 -lm none", log_dir=str(tmp_path))
    assert row["returncode"] == 1 and row["decode_tok_s"] is None and row["raw"] is None
    assert row["warning_lines"] == ["error: failed to load model"] and "failed to load" in row["stderr_tail"]
    with pytest.raises(RuntimeError, match="no llama-bench sweep run decoded"):
        rb.tuned(bench, "model.gguf", [0], sweep_ncmoe=99, threads=(4,), log=lambda line: None, log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="repeats"):
        rb.run_one(bench, "model.gguf", 0, repeats=0)


def test_cache_runner_counts_the_entries_between_a_cold_one_and_a_spare(rb, tmp_path):
    batched = _fake(tmp_path, "llama-batched-bench", FAKE_BATCHED_BENCH, FIXTURE=FIXTURES / "batched-bench.jsonl",
                    STDERR=FIXTURES / "batched-bench.stderr.txt")
    row = rb.run_cache(batched, "model.gguf", 6, 4096, prompt=128, gen=32, repeats=2, flags="-t 16 -fa 1 -lm none",
                       log_dir=str(tmp_path))
    command = row["command"].split()
    assert command[command.index("-npp") + 1] == "128,128,128,128" and command[command.index("-c") + 1] == "160"
    assert command[command.index("--moe-cache-mib") + 1] == "4096" and command[command.index("-ncmoe") + 1] == "6"
    entries = [json.loads(line) for line in (FIXTURES / "batched-bench.jsonl").read_text().splitlines() if line]
    assert row["raw"] == entries[1:3] and row["repeats"] == 2
    assert row["decode_tok_s"] == sum(e["speed_tg"] for e in entries[1:3]) / 2
    assert row["tool"] == "llama-batched-bench" and row["moe_cache_mib"] == 4096 and row["warnings"] == 4
    with pytest.raises(ValueError, match="cache_mib"):
        rb.run_cache(batched, "model.gguf", 6, -1)


def test_cli_rejects_bad_input_in_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "bench.llamacpp.run_llama_bench", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    done = cli("--llama-bench", str(tmp_path / "none"), "-m", "x.gguf")
    assert done.returncode == 2 and done.stderr.strip().endswith(f"no such file: {tmp_path / 'none'}")
    done = cli("--llama-bench", sys.executable, "-m", sys.executable, "--sweep-ncmoe", "3", "--flags", "-t 4")
    assert done.returncode == 2 and "exclude each other" in done.stderr
    done = cli("--llama-bench", sys.executable, "-m", sys.executable, "--moe-cache-mib", "64")
    assert done.returncode == 2 and "needs --batched-bench" in done.stderr


def _real_build():
    """LLAMACPP_DIR: a bench/llamacpp/build.sh DIR (llama.cpp/ and build-cuda/ or build-cpu/ with both binaries;
    build-cuda first)."""
    root = os.environ.get("LLAMACPP_DIR")
    if not root:
        pytest.skip("LLAMACPP_DIR is not set (a bench/llamacpp/build.sh DIR with both binaries built)")
    for build in ("build-cuda", "build-cpu"):
        bin_dir = Path(root) / build / "bin"
        if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-batched-bench").exists():
            return Path(root), bin_dir
    pytest.skip(f"no build-cuda/bin or build-cpu/bin with llama-bench and llama-batched-bench under {root}")


def test_real_binaries_on_the_tiny_model(rb, tmp_path):
    root, bin_dir = _real_build()
    torch = pytest.importorskip("torch")
    common = bench_module("common")
    common.generate_model(str(tmp_path / "tiny"), common.SPECS["tiny"], torch.device("cpu"))
    gguf = str(tmp_path / "tiny.gguf")
    subprocess.run([sys.executable, "-m", "bench.llamacpp.convert_qwen3moe_gguf", str(tmp_path / "tiny"), gguf,
                    "--llama-cpp", str(root / "llama.cpp")], cwd=ROOT, check=True, capture_output=True)
    report = rb.tuned(str(bin_dir / "llama-bench"), gguf, [0, 2], sweep_ncmoe=1, threads=(1,), prompt=16, gen=8,
                      log=lambda line: None, log_dir=str(tmp_path / "logs"))
    commit = (root / "llama.cpp" / "COMMIT").read_text().strip()
    for row in report["sweep"] + report["rows"]:
        assert row["returncode"] == 0 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["repeats"] == 3
        assert row["build"]["build_commit"] == commit and row["load_mode"] in ("mmap", "none")
    mmap_rows = [r for r in report["sweep"] if r["load_mode"] == "mmap"]
    assert mmap_rows and all(any("--load-mode none" in line for line in r["warning_lines"]) for r in mmap_rows)
    on_gpu = bool(report["rows"][0]["build"]["gpu_info"])  # a CUDA build without a usable GPU runs on the CPU
    pinned = [r for r in report["sweep"] if r["load_mode"] == "none"]
    assert all(("CUDA_Host" in r["model_buffers_mib"]) == on_gpu for r in pinned)
    batched = str(bin_dir / "llama-batched-bench")
    plain = rb.run_cache(batched, gguf, 1, 0, prompt=16, gen=8, flags=report["llamacpp_flags"],
                         log_dir=str(tmp_path / "logs"))
    # on the tiny model an entry takes a millisecond, too short for the spare entry to cover the common log's lag
    assert plain["returncode"] == 0 and plain["decode_tok_s"] > 0 and 1 <= plain["repeats"] <= 3
    cached = rb.run_cache(batched, gguf, 2, 1, prompt=16, gen=8, flags=report["llamacpp_flags"],
                          log_dir=str(tmp_path / "logs"))
    if on_gpu:
        # the cache's size is logged when it is made; its hit rates, when the context is freed, can be lost
        assert cached["returncode"] == 0 and cached["moe_cache"]["buffers"], cached["warning_lines"]
    else:  # "E ... MoE cache requires a GPU backend" comes through the common log, which can lose it at exit
        assert cached["returncode"] == 1
        assert any("failed to create the llama_context" in line for line in cached["warning_lines"])
