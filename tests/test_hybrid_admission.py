"""bench/hybrid_admission.py: the replay of which misses the CPU takes under LRU admission, on a hand-worked trace.

Two resident slots (experts 0 and 1 as loaded), top-2, the CPU taking one miss of any step (split [0, 1, 1]).
At step 2 ([2, 4]) the highest-weight miss is 2, used a step ago; the least recently used miss is 4, never
used: "top" sends 2 to the CPU and admits 4, "stale" the reverse, so step 3 ([2, 3]) hits twice under "stale".
"""

from repo_scripts import bench_module

STEPS = [[2, 3], [3, 2], [2, 4], [2, 3]]  # router order, one decode step each


def _module():
    return bench_module("hybrid_admission")


def test_cpu_picks():
    sim = _module()
    assert sim.cpu_pick([5, 3, 9], 2, "top", {}) == [5, 3]
    assert sim.cpu_pick([5, 3, 9], 2, "bottom", {}) == [3, 9]
    assert sim.cpu_pick([5, 3, 9], 2, "stale", {3: 4, 9: 1}) == [5, 9]  # never used, then the oldest use
    assert sim.cpu_pick([5, 3], 0, "stale", {}) == []


def test_replay_counts_on_a_hand_worked_trace():
    sim = _module()
    split = [0, 1, 1]
    assert sim.replay(STEPS, 2, split, "top") == {"hits": 2, "cpu": 4, "gpu_reads": 2}
    assert sim.replay(STEPS, 2, split, "stale") == {"hits": 3, "cpu": 3, "gpu_reads": 2}
    assert sim.replay(STEPS, 2, None, "top") == {"hits": 4, "cpu": 0, "gpu_reads": 4}  # LRU alone
    assert sim.replay(STEPS, 2, None, "top", admit=False) == {"hits": 0, "cpu": 0, "gpu_reads": 8}  # static set
