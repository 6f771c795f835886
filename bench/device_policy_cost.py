"""What the device cache policies cost per MoE layer and decode step on the GPU: plan + commit of
policy/device_lru.py and policy/device_lfru.py, each as its Triton kernels, replayed from a CUDA graph as the
engine's decode steps are.

Why: LFRU's hit rate beats LRU's on learned routing (bench/RESULTS.md, "Cache policy on learned routing"), by
0.003-0.015 at ratios 25 and 50 on the 128-expert model; every decode step pays the policy's plan and commit in
every MoE layer, so the engine's default is chosen on both: the bytes the extra hits save against this time.

Each step: the step's expert ids copied into the graph's input, then the graph (plan, commit) replayed; the same
with an empty graph body gives the copy's share, subtracted. Routing: the trained 128-expert model's recorded
routing (bench/routing_replay.py's stream of its report traces, layer 0), E = 128, top-8; capacities as ratios of
E. Reported: microseconds per step (median of --trials, each over --steps steps) and each policy's hit rate on
those steps (a check that both ran the routing, not a result: bench/cache_policy_learned.py has those).

Usage (GPU machine): python -m bench.device_policy_cost --out FILE.json [--ratios 10,25,50] [--steps 2000]
On a CPU (Triton's interpreter, no graphs): TRITON_INTERPRET=1 python -m bench.device_policy_cost --steps 5 ...
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import log, machine, utc_now, versions, write_report
from bench.routing_replay import learned_stream
from moe_offload.policy import LFRUPolicy, LRUPolicy, SlotTable
from moe_offload.policy.device_lfru import DeviceLFRU
from moe_offload.policy.device_lru import DeviceLRU
from moe_offload.policy.lfru import DEFAULT_HALF_LIFE

EXPERTS = 128


def device_policy(name: str, capacity: int, device: torch.device):
    """A device policy over E experts with experts 0..C-1 in the slots (as a load preloads them)."""
    table = SlotTable(capacity, LFRUPolicy(DEFAULT_HALF_LIFE) if name == "lfru" else LRUPolicy())
    for expert in range(capacity):
        table.admit(expert, ())
    slots = [table.lookup(e) if table.lookup(e) is not None else capacity + e for e in range(EXPERTS)]
    slot_of = torch.tensor(slots + [0], dtype=torch.int32, device=device)  # [E + 1]
    from_host = (slot_of >= capacity).long()
    pairs = [(table.lookup(e), e) for e in table.policy.cached()]
    if name == "lfru":
        policy = DeviceLFRU(slot_of, from_host, list(range(EXPERTS)), pairs, table.policy.state(), DEFAULT_HALF_LIFE,
                            fused=True)
    else:
        policy = DeviceLRU(slot_of, from_host, list(range(EXPERTS)), pairs, fused=True)
    return policy, slot_of


def run_steps(name: str, capacity: int, rows: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(seconds per step over rows [N, K], hit rate); name "none": the ids' copy alone."""
    ids = rows[0].clone()  # [K] the graph's input
    policy, slot_of = device_policy(name if name != "none" else "lru", capacity, device)
    hits = torch.zeros(1, dtype=torch.long, device=device)

    def step() -> None:
        if name != "none":
            hits.add_((slot_of[ids] < capacity).sum())
            policy.plan(ids)
            policy.commit()

    step()  # compiles, makes the plan buffers
    run = step
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
        torch.cuda.synchronize()
    hits.zero_()
    started = time.perf_counter()
    for index in range(rows.shape[0]):
        ids.copy_(rows[index])
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / rows.shape[0]
    return seconds, int(hits.item()) / rows.numel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="10,25,50")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = learned_stream()[0][:args.steps].to(device)  # [N, 8] decode-like: one token's experts per step
    results = {}
    for ratio in [int(r) for r in args.ratios.split(",")]:
        capacity = int(EXPERTS * ratio / 100 + 0.5)
        trials = {name: [] for name in ("none", "lru", "lfru")}
        hit_rate = {}
        for _ in range(args.trials):
            for name in trials:  # taking turns
                seconds, rate = run_steps(name, capacity, rows, device)
                trials[name].append(seconds * 1e6)
                hit_rate[name] = rate
        medians = {name: statistics.median(us) for name, us in trials.items()}
        results[str(ratio)] = {
            "capacity": capacity, "us_per_step": trials, "median_us_per_step": medians,
            "policy_us_per_step": {name: medians[name] - medians["none"] for name in ("lru", "lfru")},
            "hit_rate": {name: hit_rate[name] for name in ("lru", "lfru")}}
        log(f"ratio {ratio} (C={capacity}): " + ", ".join(
            f"{name} {results[str(ratio)]['policy_us_per_step'][name]:.2f} us/step, hit rate "
            f"{hit_rate[name]:.3f}" for name in ("lru", "lfru")) + f"; the copy alone {medians['none']:.2f} us")
    write_report(args.out, {"date": utc_now(), "machine": machine(), "versions": versions(),
                            "what": "plan + commit of one MoE layer's decode step per device policy, Triton kernels,"
                                    " CUDA-graph replays (CUDA); the ids' copy alone subtracted",
                            "experts": EXPERTS, "top_k": int(rows.shape[1]), "steps": int(rows.shape[0]),
                            "routing": "trained 128-expert model's recorded routing (report traces, layer 0)",
                            "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
