"""bench/cpu_expert_spread.py: a process per trial times the numba CPU expert kernel, free or pinned threads."""

from __future__ import annotations

import json
import os

from repo_scripts import run_bench


def test_a_trial_runs_in_its_own_process_and_pinning_pins(tmp_path, monkeypatch):
    # Each trial process compiles the numba kernel afresh, which is most of this test's time: one process, of the
    # variant that does something (pinned; free leaves the threads where the OS puts them). What is checked here
    # is the process per trial, the pinning and the report, not the kernel's speed or its results (those are
    # test_cpu_experts'), so the child compiles it without LLVM's optimisation passes.
    monkeypatch.setenv("NUMBA_OPT", "0")
    out = tmp_path / "spread.json"
    done = run_bench("cpu_expert_spread", "--trials", "1", "--variants", "pinned", "--experts", "9", "--hidden",
                     "64", "--inter", "32", "--threads", "2", "--repeats", "3", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    cpus = sorted(os.sched_getaffinity(0))
    assert set(report["runs"]) == {"pinned"}
    pinned = report["runs"]["pinned"][0]
    assert pinned["median_ms"] > 0 and pinned["huge_pages"] in (True, False)
    assert pinned["worker_affinity"] == [[cpus[1 % len(cpus)]]] and pinned["caller_cpu"] == cpus[0]
    assert report["summary"]["pinned"]["medians_ms"] == [pinned["median_ms"]]
