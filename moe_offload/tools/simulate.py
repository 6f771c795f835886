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

"lfru": policy.LFRUPolicy, recency + frequency (a use count decayed with a half-life; lfru.py).

"default": the engine's policy, policy.DEFAULT_POLICY (the result names it).

"per-layer": the default eviction policy (or --eviction's), but the layers' capacities re-split from the trace
itself in proportion to each layer's churn, same total (policy/allocation.py). Sees the trace's own statistics.

"shared": the default eviction policy (or --eviction's) over ONE pool of all layers' slots (same total), keys
(layer, expert); layers are replayed interleaved in execution order (step by step, layer by layer).

"prefetch": the default eviction policy (or --eviction's), plus, before each decode step of a layer, the experts
the trace's "predicted" field names (moe-offload trace --predict) are fetched if not cached (policy/prefetch.py);
"prefetched" counts them, "prefetch_used" those the step then needed. --prefetch-limit N fetches only the N most
probable of them per layer and step (what fits in the link's idle time; see policy/prefetch.py).

"min": policy.MinPolicy, the offline optimum: Belady's MIN generalised to cache.py's mechanism; policy.py
states the rule and proves it optimal, so "min" hits >= the hits of any policy cache.py could run on the trace
with the engine's per-layer capacities (per-layer, shared and prefetch change the mechanism and may beat it).

Every miss moves one expert (admitted or streamed), every prefetch one more: "loads" = misses + prefetched,
and total["decode_loads_per_token"] = decode loads over decode steps (one token each), to multiply by an
expert's bytes for bytes per token.

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
from ..errors import MoeOffloadError, positive_int
from ..policy import DEFAULT_POLICY, POLICIES, MinPolicy, SlotTable, make_policy
from ..policy.allocation import churn, layer_capacities
from ..policy.prefetch import prefetch_plan

STEP_MODES = ("auto", "forward", "token")
PHASES = ("prefill", "decode")
POLICY_NAMES = (*POLICIES, "per-layer", "shared", "prefetch", "min", "default")
DEFAULT_CLI_POLICIES = ("lru", "default", "min")


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


def replay_steps(records: list[dict[str, Any]], step: str = "auto", predicted: bool = False
                 ) -> tuple[str, dict[int, list[tuple]]]:
    """Per layer, the steps in replay order as (sorted unique needed experts, phase); and the mode used.
    predicted=True: (needed, phase, sorted unique "predicted" experts of the step's records) instead."""
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
    guessed: dict[int, dict[Any, dict[int, None]]] = {}  # ordered: best first
    if predicted and not all("predicted" in r for r in records):
        raise MoeOffloadError('prefetch needs a "predicted" field in every record (moe-offload trace --predict)')
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
        if predicted:
            best_first = guessed.setdefault(int(r["layer"]), {}).setdefault(key, {})
            best_first.update(dict.fromkeys(int(e) for e in r["predicted"]))
    ordered = sorted(order, key=order.__getitem__)
    result = {layer: [(sorted(by_key[k]), phase_of[k]) + ((list(guessed[layer][k]),) if predicted else ())
                      for k in ordered if k in by_key]
              for layer, by_key in needed.items()}
    return step, result


def _rate(hits: int, misses: int) -> dict[str, Any]:
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}


def simulate(trace_records, num_experts: int | Mapping[Any, int] | None = None, ratio: Any = 100,
             policy: str = "lru", step: str = "auto", options: Mapping[str, Any] | None = None,
             prefetch_limit: int | None = None, eviction: str | None = None) -> dict[str, Any]:
    """Replay a trace through per-layer caches; hits, misses and hit_rate per layer and in total.

    trace_records: a trace.Trace (its meta supplies num_experts when not given) or a list of records.
    num_experts: routed experts per layer, an int for all layers or {layer: E}.
    ratio: MOE_OFFLOAD_RATIO (0-100). policy: one of POLICY_NAMES. step: "auto", "forward" or "token".
    options: keyword arguments for the eviction policy's constructor (e.g. {"half_life": 32} for LFRU).
    prefetch_limit: with policy "prefetch", at most this many experts fetched per layer and step, the most
    probable first (None: every predicted one).
    eviction: the eviction policy (a name of POLICIES) under "per-layer", "shared" and "prefetch"; None: the
    engine's default.
    Returns {"policy", "eviction", "ratio", "step", "layers": {layer: {...}}, "total": {...}} where each {...}
    has hits, misses, hit_rate, loads, prefetched, prefetch_used and the same for "prefill" and "decode" steps;
    layers also carry num_experts, capacity and steps; total carries decode_loads_per_token.
    """
    records, meta = _unpack(trace_records)
    ratio = parse_ratio(ratio)
    if policy not in POLICY_NAMES:
        raise MoeOffloadError(f"unknown policy {policy!r} (known: {', '.join(POLICY_NAMES)})")
    if eviction is not None and (eviction not in POLICIES or policy in (*POLICIES, "min", "default")):
        raise MoeOffloadError(f"eviction {eviction!r}: one of {', '.join(POLICIES)}, under per-layer, shared or "
                              f"prefetch")
    eviction = "min" if policy == "min" else policy if policy in POLICIES else eviction or DEFAULT_POLICY
    mode, steps_by_layer = replay_steps(records, step, predicted=policy == "prefetch")
    layer_ids = sorted(steps_by_layer)
    experts = _experts_per_layer(layer_ids, num_experts, meta)
    config = OffloadConfig(moe_offload_ratio=ratio)
    capacity = {layer: config.resident_count(experts[layer]) for layer in layer_ids}
    if policy == "per-layer":
        churns = {layer: churn([s[0] for s in steps_by_layer[layer]]) for layer in layer_ids}
        capacity = layer_capacities(churns, capacity, experts)
    if policy == "shared":
        counts_by_layer = _replay_shared(steps_by_layer, experts, capacity, eviction, options or {})
    else:
        counts_by_layer = {layer: _replay_layer(steps_by_layer[layer], experts[layer], capacity[layer], eviction,
                                                layer, prefetch=policy == "prefetch", options=options or {},
                                                prefetch_limit=prefetch_limit)
                           for layer in layer_ids}
    layers: dict[int, dict[str, Any]] = {}
    for layer in layer_ids:
        counts = counts_by_layer[layer]
        layers[layer] = {"num_experts": experts[layer], "capacity": capacity[layer],
                         "steps": len(steps_by_layer[layer]), **_row(counts, PHASES),
                         **{phase: _row(counts, (phase,)) for phase in PHASES}}
    every = list(counts_by_layer.values())
    total = {**_row_sum(every, PHASES), **{phase: _row_sum(every, (phase,)) for phase in PHASES}}
    decode_steps = sum(1 for s in steps_by_layer[layer_ids[0]] if s[1] == "decode") if layer_ids else 0
    total["decode_loads_per_token"] = total["decode"]["loads"] / decode_steps if decode_steps else None
    return {"policy": policy, "eviction": eviction, "ratio": ratio, "step": mode, "layers": layers, "total": total}


def _row(counts: dict[str, list[int]], phases: tuple[str, ...]) -> dict[str, Any]:
    return _row_sum([counts], phases)


def _row_sum(many: list[dict[str, list[int]]], phases: tuple[str, ...]) -> dict[str, Any]:
    hits = sum(c[p][0] for c in many for p in phases)
    misses = sum(c[p][1] for c in many for p in phases)
    fetched = sum(c["prefetch"][p][0] for c in many for p in phases if "prefetch" in c)
    used = sum(c["prefetch"][p][1] for c in many for p in phases if "prefetch" in c)
    return {**_rate(hits, misses), "loads": misses + fetched, "prefetched": fetched, "prefetch_used": used}


def _chooser(policy: str, steps: list[tuple], capacity: int, options: Mapping[str, Any]):
    return MinPolicy([s[0] for s in steps], capacity) if policy == "min" else make_policy(policy, **options)


def _check_ids(needed: list[int], num_experts: int, layer: int) -> None:
    if needed and not (0 <= needed[0] and needed[-1] < num_experts):
        bad = needed[0] if needed[0] < 0 else needed[-1]
        raise MoeOffloadError(f"layer {layer}: expert id {bad} outside 0..{num_experts - 1}")


def _replay_step(table: SlotTable, keys: list, counts: dict[str, list[int]], phase: str, chooser=None,
                 index: int = 0) -> None:
    """One step of one layer against `table`: count hits and misses, then admit the misses (cache.py's order)."""
    table.begin_step()
    hits = [k for k in keys if table.lookup(k) is not None]
    misses = [k for k in keys if table.lookup(k) is None]
    counts[phase][0] += len(hits)
    counts[phase][1] += len(misses)
    for key in hits:
        table.hit(key)
    begin_step = getattr(chooser, "begin_step", None)
    if begin_step is not None:
        begin_step(index, keys)
    before_admit = getattr(chooser, "before_admit", None)
    protected = set(keys)
    for key in misses:
        if not table.capacity:
            continue  # streamed
        if before_admit is not None:
            before_admit(key)
        table.admit(key, protected)  # None: streamed without caching


def _replay_layer(steps: list[tuple], num_experts: int, capacity: int, policy: str,
                  layer: int, prefetch: bool = False, options: Mapping[str, Any] | None = None,
                  prefetch_limit: int | None = None) -> dict[str, Any]:
    """One layer's own cache over its steps: counts[phase] = [hits, misses] (+ counts["prefetch"][phase] =
    [prefetched, used] with prefetch, where each step is (needed, phase, predicted best first))."""
    chooser = _chooser(policy, steps, capacity, options or {})
    table = SlotTable(capacity, chooser)
    for expert in range(capacity):  # OffloadedExperts.preload(range(C))
        table.admit(expert, ())
    counts: dict[str, Any] = {phase: [0, 0] for phase in PHASES}
    if prefetch:
        counts["prefetch"] = {phase: [0, 0] for phase in PHASES}
    for index, (needed, phase, *predicted) in enumerate(steps):
        _check_ids(needed, num_experts, layer)
        if prefetch and phase == "decode" and table.capacity:
            guess = set(predicted[0])
            fetched = [e for e in prefetch_plan(predicted[0], table, prefetch_limit)
                       if table.admit(e, guess, force=True) is not None]
            counts["prefetch"][phase][0] += len(fetched)
            counts["prefetch"][phase][1] += len(set(fetched) & set(needed))
        _replay_step(table, needed, counts, phase, chooser, index)
    return counts


def _replay_shared(steps_by_layer: dict[int, list[tuple]], experts: dict[int, int], capacity: dict[int, int],
                   policy: str, options: Mapping[str, Any]) -> dict[int, dict[str, list[int]]]:
    """One pool of sum(capacity) slots for all layers, keys (layer, expert), replayed step by step, layer by layer;
    each layer starts with its experts 0..C-1 cached. Per layer counts as _replay_layer's."""
    table = SlotTable(sum(capacity.values()), make_policy(policy, **options))
    for layer in sorted(steps_by_layer):
        for expert in range(capacity[layer]):
            table.admit((layer, expert), ())
    counts = {layer: {phase: [0, 0] for phase in PHASES} for layer in steps_by_layer}
    longest = max((len(steps) for steps in steps_by_layer.values()), default=0)
    for index in range(longest):
        for layer in sorted(steps_by_layer):
            if index < len(steps_by_layer[layer]):
                needed, phase = steps_by_layer[layer][index][:2]
                _check_ids(needed, experts[layer], layer)
                _replay_step(table, [(layer, e) for e in needed], counts[layer], phase)
    return counts


# ----------------------------------------------------------------------------------------------- CLI


def format_result(result: dict[str, Any]) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    name = result["policy"] + (f" ({result['eviction']})" if result["eviction"] != result["policy"] else "")
    per_token = result["total"].get("decode_loads_per_token")
    lines = [f"policy {name}  ratio {result['ratio']}  step {result['step']}"
             + ("" if per_token is None else f"  decode loads/token {per_token:.2f}")
             + (f"  prefetched {result['total']['prefetched']} (used {result['total']['prefetch_used']})"
                if result["policy"] == "prefetch" else ""),
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
        result = simulate(trace, args.num_experts, args.ratio, policy, args.step, prefetch_limit=args.prefetch_limit,
                          eviction=args.eviction if policy in ("per-layer", "shared", "prefetch") else None)
        print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


def add_simulate_command(subparsers) -> argparse.ArgumentParser:
    """Register `simulate` on an argparse subparsers object; returns the subparser."""
    sim = subparsers.add_parser("simulate", help="replay a routing trace through the expert cache (no GPU)")
    sim.add_argument("trace", help="JSONL trace written by `moe-offload trace`")
    sim.add_argument("--policy", action="append", choices=POLICY_NAMES, default=None,
                     help=f"{', '.join(POLICY_NAMES)} (repeatable; default: {', '.join(DEFAULT_CLI_POLICIES)}); "
                          f"prefetch needs a trace recorded with --predict")
    sim.add_argument("--ratio", default=100, help="MOE_OFFLOAD_RATIO to simulate (0-100)")
    sim.add_argument("--step", choices=STEP_MODES, default="auto", help="forward (engine), token, or auto")
    sim.add_argument("--num-experts", type=int, default=None, help="routed experts per layer (default: trace meta)")
    sim.add_argument("--prefetch-limit", type=positive_int, default=None, metavar="N",
                     help="prefetch: at most N experts per layer and step, the most probable first (default: all)")
    sim.add_argument("--eviction", choices=tuple(POLICIES), default=None,
                     help="the eviction policy under per-layer, shared and prefetch (default: the engine's)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(run=_run_simulate)
    return sim


def _run_simulate(args: argparse.Namespace) -> int:
    args.policy = args.policy or list(DEFAULT_CLI_POLICIES)
    return _cmd_simulate(args)
