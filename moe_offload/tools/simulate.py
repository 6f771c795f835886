"""Replay a routing trace (trace.py) through the expert cache of each MoE layer, without a GPU.

The replay uses the engine's own bookkeeping (policy.SlotTable) and the engine's own policies (policy.py), so
for "lru" the hits and misses are exactly those that OffloadedExperts counts when the same routing runs at the
same ratio from a fresh load:

- per layer, capacity C = OffloadConfig(moe_offload_ratio=ratio).resident_count(E);
- at the start experts 0..C-1 are cached, inserted in that order (OffloadedExperts.preload);
- per step (one forward call: a whole prefill, or one decode token; see `step` below) the needed experts are
  the unique experts of the step's tokens, in ascending id order; each is a hit if cached (policy.on_hit, in
  that order), else a miss; misses are then admitted in ascending id order, each evicting the policy's victim
  among cached experts NOT needed by this step, or streamed without caching when no victim may be evicted or
  C == 0.

Policies
--------
"lru": policy.LRUPolicy, the engine's policy.

"min": policy.MinPolicy, the offline optimum: Belady's MIN generalised to cache.py's mechanism; policy.py
states the rule and proves it optimal, so "min" hits >= the hits of any policy cache.py could run on the trace.

Steps
-----
`step="forward"` groups records by their "step" field (one forward call; the engine's granularity, required
for exact agreement with the engine). `step="token"` makes each (request, token) its own step, as if every
token were decoded alone. `step="auto"` (default) is "forward" when every record has a "step" field, else
"token". A step is counted as "prefill" when its forward includes a request's token 0, else "decode"; both
are reported besides the total (the cache state always runs through all steps).

Command line: `moe-offload simulate TRACE --policy lru --ratio 37`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterable, Mapping

from ..config import OffloadConfig, parse_ratio
from ..errors import MoeOffloadError
from ..policy import LRUPolicy, MinPolicy, SlotTable

STEP_MODES = ("auto", "forward", "token")
PHASES = ("prefill", "decode")
POLICY_NAMES = ("lru", "min")


def _unpack(trace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = getattr(trace, "records", None)
    if records is not None:
        return list(records), dict(getattr(trace, "meta", {}) or {})
    return list(trace), {}


def _experts_per_layer(layers: Iterable[int], num_experts, meta: Mapping[str, Any]) -> dict[int, int]:
    source = num_experts if num_experts is not None else meta.get("num_experts")
    if source is None:
        raise MoeOffloadError("number of routed experts unknown: pass num_experts (the trace has no meta)")
    result = {}
    for layer in layers:
        if isinstance(source, Mapping):
            value = source.get(layer, source.get(str(layer)))
            if value is None:
                raise MoeOffloadError(f"number of routed experts of layer {layer} unknown")
        else:
            value = source
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MoeOffloadError(f"number of routed experts must be a positive integer, got {value!r}")
        result[layer] = value
    return result


def replay_steps(records: list[dict[str, Any]], step: str = "auto"
                 ) -> tuple[str, dict[int, list[tuple[list[int], str]]]]:
    """Per layer, the steps in replay order as (sorted unique needed experts, phase); and the mode used."""
    if step not in STEP_MODES:
        raise MoeOffloadError(f"step must be one of {', '.join(STEP_MODES)}, got {step!r}")
    has_step = bool(records) and all("step" in r for r in records)
    if step == "auto":
        step = "forward" if has_step else "token"
    if step == "forward" and not has_step:
        raise MoeOffloadError('step="forward" needs a "step" field in every record (record with trace.py)')
    # A forward is a prefill when it holds a request's token 0 (without step ids: the token-0 record itself).
    prefill = {r["step"] for r in records if r["token"] == 0} if has_step else None
    order: dict[Any, Any] = {}  # step key -> sort key (execution order)
    phase_of: dict[Any, str] = {}
    needed: dict[int, dict[Any, set[int]]] = {}
    for r in records:
        if step == "forward":
            key = sort_key = r["step"]
        else:
            key = (r["request"], r["token"])
            sort_key = (r["step"], r["token"]) if has_step else len(order)  # without step ids: file order
        if key not in order:
            order[key] = sort_key
            phase_of[key] = "prefill" if (r["step"] in prefill if has_step else r["token"] == 0) else "decode"
        experts = needed.setdefault(int(r["layer"]), {}).setdefault(key, set())
        experts.update(int(e) for e in r["experts"])
    ordered = sorted(order, key=order.__getitem__)
    result = {layer: [(sorted(by_key[k]), phase_of[k]) for k in ordered if k in by_key]
              for layer, by_key in needed.items()}
    return step, result


def _rate(hits: int, misses: int) -> dict[str, Any]:
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}


def simulate(trace_records, num_experts: int | Mapping[Any, int] | None = None, ratio: Any = 100,
             policy: str = "lru", step: str = "auto") -> dict[str, Any]:
    """Replay a trace through per-layer caches; hits, misses and hit_rate per layer and in total.

    trace_records: a trace.Trace (its meta supplies num_experts when not given) or a list of records.
    num_experts: routed experts per layer, an int for all layers or {layer: E}.
    ratio: MOE_OFFLOAD_RATIO (0-100). policy: "lru" or "min". step: "auto", "forward" or "token".
    Returns {"policy", "ratio", "step", "layers": {layer: {...}}, "total": {...}} where each {...} has hits,
    misses, hit_rate and the same three for "prefill" and "decode" steps; layers also carry num_experts,
    capacity and steps.
    """
    records, meta = _unpack(trace_records)
    ratio = parse_ratio(ratio)
    if policy not in POLICY_NAMES:
        raise MoeOffloadError(f"unknown policy {policy!r} (known: {', '.join(POLICY_NAMES)})")
    mode, steps_by_layer = replay_steps(records, step)
    experts = _experts_per_layer(sorted(steps_by_layer), num_experts, meta)
    config = OffloadConfig(moe_offload_ratio=ratio)
    layers: dict[int, dict[str, Any]] = {}
    totals = {phase: [0, 0] for phase in PHASES}
    for layer in sorted(steps_by_layer):
        steps = steps_by_layer[layer]
        count = experts[layer]
        capacity = config.resident_count(count)
        counts = _replay_layer(steps, count, capacity, policy, layer)
        for phase in PHASES:
            totals[phase][0] += counts[phase][0]
            totals[phase][1] += counts[phase][1]
        hits = sum(counts[p][0] for p in PHASES)
        misses = sum(counts[p][1] for p in PHASES)
        layers[layer] = {"num_experts": count, "capacity": capacity, "steps": len(steps), **_rate(hits, misses),
                         **{phase: _rate(*counts[phase]) for phase in PHASES}}
    total_hits = sum(totals[p][0] for p in PHASES)
    total_misses = sum(totals[p][1] for p in PHASES)
    return {"policy": policy, "ratio": ratio, "step": mode, "layers": layers,
            "total": {**_rate(total_hits, total_misses), **{phase: _rate(*totals[phase]) for phase in PHASES}}}


def _replay_layer(steps: list[tuple[list[int], str]], num_experts: int, capacity: int, policy: str,
                  layer: int) -> dict[str, list[int]]:
    if policy == "min":
        chooser: Any = MinPolicy([needed for needed, _ in steps], capacity)
    else:
        chooser = LRUPolicy()
    table = SlotTable(capacity, chooser)
    for expert in range(capacity):  # OffloadedExperts.preload(range(C))
        table.admit(expert, ())
    begin_step = getattr(chooser, "begin_step", None)
    before_admit = getattr(chooser, "before_admit", None)
    counts = {phase: [0, 0] for phase in PHASES}
    for index, (needed, phase) in enumerate(steps):
        if needed and not (0 <= needed[0] and needed[-1] < num_experts):
            bad = needed[0] if needed[0] < 0 else needed[-1]
            raise MoeOffloadError(f"layer {layer}: expert id {bad} outside 0..{num_experts - 1}")
        hits = [e for e in needed if table.lookup(e) is not None]
        misses = [e for e in needed if table.lookup(e) is None]
        counts[phase][0] += len(hits)
        counts[phase][1] += len(misses)
        for expert in hits:
            table.hit(expert)
        if begin_step is not None:
            begin_step(index, needed)
        protected = set(needed)
        for expert in misses:
            if not table.capacity:
                continue  # streamed
            if before_admit is not None:
                before_admit(expert)
            table.admit(expert, protected)  # None: streamed without caching
    return counts


# ----------------------------------------------------------------------------------------------- CLI


def format_result(result: dict[str, Any]) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [f"policy {result['policy']}  ratio {result['ratio']}  step {result['step']}",
             "layer  experts  cached  hits  misses  hit_rate  decode_hit_rate"]
    for layer, row in result["layers"].items():
        lines.append(f"{layer:>5}  {row['num_experts']:>7}  {row['capacity']:>6}  {row['hits']:>4}  "
                     f"{row['misses']:>6}  {pct(row['hit_rate']):>8}  {pct(row['decode']['hit_rate']):>15}")
    total = result["total"]
    lines.append(f"total  {'':>7}  {'':>6}  {total['hits']:>4}  {total['misses']:>6}  {pct(total['hit_rate']):>8}  "
                 f"{pct(total['decode']['hit_rate']):>15}")
    return "\n".join(lines)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .trace import load_trace

    trace = load_trace(args.trace)
    for policy in args.policy:
        result = simulate(trace, args.num_experts, args.ratio, policy, args.step)
        print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


def add_simulate_command(subparsers) -> argparse.ArgumentParser:
    """Register `simulate` on an argparse subparsers object; returns the subparser."""
    sim = subparsers.add_parser("simulate", help="replay a routing trace through the expert cache (no GPU)")
    sim.add_argument("trace", help="JSONL trace written by `moe-offload trace`")
    sim.add_argument("--policy", action="append", choices=POLICY_NAMES, default=None,
                     help="lru or min (repeatable; default both)")
    sim.add_argument("--ratio", default=100, help="MOE_OFFLOAD_RATIO to simulate (0-100)")
    sim.add_argument("--step", choices=STEP_MODES, default="auto", help="forward (engine), token, or auto")
    sim.add_argument("--num-experts", type=int, default=None, help="routed experts per layer (default: trace meta)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(run=_run_simulate)
    return sim


def _run_simulate(args: argparse.Namespace) -> int:
    args.policy = args.policy or list(POLICY_NAMES)
    return _cmd_simulate(args)
