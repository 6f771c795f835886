"""bench/cpu_expert_spread.py: a process per trial times the numba CPU expert kernel, free or pinned threads."""

from __future__ import annotations

import json
import os

from repo_scripts import run_bench


def test_each_variant_runs_in_its_own_process_and_pinning_pins(tmp_path, monkeypatch):
    # Each trial process compiles the numba kernel afresh, which was most of this test's time. What is checked
    # here is the process per trial, the pinning and the report, not the kernel's speed or its results (those
    # are test_cpu_experts'), so the children compile it without LLVM's optimisation passes.
    monkeypatch.setenv("NUMBA_OPT", "0")
    out = tmp_path / "spread.json"
    done = run_bench("cpu_expert_spread", "--trials", "1", "--experts", "9", "--hidden", "64", "--inter", "32",
                     "--threads", "2", "--repeats", "3", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    cpus = sorted(os.sched_getaffinity(0))
    free, pinned = report["runs"]["free"][0], report["runs"]["pinned"][0]
    assert free["median_ms"] > 0 and pinned["median_ms"] > 0 and free["huge_pages"] in (True, False)
    assert free["worker_affinity"] == [cpus]  # one worker: the caller drives the other thread
    assert pinned["worker_affinity"] == [[cpus[1 % len(cpus)]]] and pinned["caller_cpu"] == cpus[0]
    assert report["summary"]["free"]["medians_ms"] == [free["median_ms"]]
