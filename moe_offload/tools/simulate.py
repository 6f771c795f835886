"""Replay a routing trace (trace.py) through the expert cache of each MoE layer, without a GPU.

The replay uses the engine's own bookkeeping (cache.SlotTable) and the engine's own policies (policy.py), so
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

"min": the offline optimum (Belady's MIN generalised to this setting). Per step i, with K the experts
cached at its start and S the experts it needs, the experts needed AND cached (K & S) must stay (cache.py
never evicts an expert the step in flight needs); the other C - |K & S| slots go to the experts of
(K | S) - (K & S), i.e. the cached experts the step does not need plus the step's misses, whose future-use
sequences are lexicographically earliest. The future-use sequence of an expert is the ascending list of later
steps of this layer that need it (never again = +inf, latest of all). Misses not chosen are streamed (bypass),
cached experts not chosen are the victims. For steps that need one expert this is exactly Belady's rule with
bypass: among the cached experts and the incoming one, drop the one whose next use is furthest (dropping the
incoming one = streaming it).

Why MIN is optimal (so "min" hits >= the hits of ANY policy cache.py could run on the trace, LRU included):
on one layer, a run of cache.py is a sequence of cache states K_1, K_2, ... such that for every step i
(a) K_{i+1} <= K_i | S_i (demand paging: an expert enters only on a miss of the step), (b) K_{i+1} >= K_i & S_i
(the protected rule), (c) |K_{i+1}| <= C; its hits are sum_i |S_i & K_i|. Every choice of victims and
bypasses gives such a sequence and every such sequence comes from some choice, so the best policy maximises
hits over these sequences. (An empty slot counts as an expert that is never needed.)
Lemma: a run A in state X + {a} can follow a run B in state X + {b} so that their states stay equal or differ
in one expert (A holds a', B holds b'). While they differ, at a step that needs neither, A makes B's move with
a' for b' (if B drops b', A drops a' and the states are equal); that needs both, both hit them and must keep
them, A again makes B's move with a' for b' (or exactly B's move if B admits a'); that needs a' only, A hits
where B misses (+1 for A) and makes B's move keeping a' in place of the one expert B admits or keeps instead,
a one-expert difference again; that needs b' only, A misses where B hits (-1) but b' is then one of A's
misses, so A can move to exactly B's next state and they are equal from then on. So A never ends more than one
hit behind B, and not behind at all when the first step that needs exactly one of a, b needs a (or no step
does).
Induction: take an optimal run that agrees with MIN before step i's move but keeps y where MIN keeps x (both in
(K | S) - (K & S)). MIN ranked x first, fut(x) <= fut(y) lexicographically: the steps before the two sequences
first differ need both, and the first step that needs exactly one of them needs x. By the lemma, keeping x
instead of y and then following the optimal run loses nothing, so that run is optimal too and agrees with MIN
on one more expert. Repeating makes an optimal run that moves like MIN at step i, then i+1, and so on.
tests/test_trace_simulate.py also checks MIN against an exhaustive search on small random traces.

The lexicographic tie-break matters: with only the NEXT use compared, two experts both needed by the next
step tie, and a wrong pick makes the loser a permanently streamed expert while both are needed together
(protected rule); such a "MIN" is beaten by LRU on some traces. The optimum is for cache.py's mechanism
(protected rule, demand paging): a mechanism that could evict an expert the step just used, after computing
it, or prefetch ahead of a miss, could do better.

Steps
-----
`step="forward"` groups records by their "step" field (one forward call; the engine's granularity, required
for exact agreement with the engine). `step="token"` makes each (request, token) its own step, as if every
token were decoded alone. `step="auto"` (default) is "forward" when every record has a "step" field, else
"token". A step is counted as "prefill" when its forward includes a request's token 0, else "decode"; both
are reported besides the total (the cache state always runs through all steps).

Command line (until cli.py wires it): `python -m moe_offload.simulate TRACE --policy lru --ratio 37`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from functools import cmp_to_key
from typing import Any, Collection, Iterable, Mapping

from .cache import SlotTable
from .config import OffloadConfig, parse_ratio
from .errors import MoeOffloadError
from .policy import LRUPolicy

STEP_MODES = ("auto", "forward", "token")
PHASES = ("prefill", "decode")


class MinPolicy:
    """Offline optimal policy for one layer (see the module docstring); knows the layer's whole future.

    `steps`: the needed experts of each step of this layer, in replay order. Beyond the EvictionPolicy
    protocol it needs two calls from the replay loop: begin_step(index, needed) after the hits of step
    `index` are counted, and before_admit(expert) before each SlotTable.admit of a miss; victim() answers
    None for a miss that is to be streamed (bypass).
    """

    name = "min"

    def __init__(self, steps: list[list[int]], capacity: int):
        self.capacity = capacity
        self._uses: dict[int, list[int]] = {}  # expert -> ascending step indices that need it
        for index, needed in enumerate(steps):
            for expert in needed:
                self._uses.setdefault(expert, []).append(index)
        self._cached: set[int] = set()
        self._now = -1
        self._admit: set[int] = set()
        self._evict: list[int] = []
        self._incoming: int | None = None

    # -- EvictionPolicy
    def on_insert(self, expert: int) -> None:
        self._cached.add(expert)

    def on_hit(self, expert: int) -> None:
        pass

    def on_evict(self, expert: int) -> None:
        self._cached.discard(expert)

    def victim(self, protected: Collection[int]) -> int | None:
        if self._incoming not in self._admit:
            return None  # bypass: the incoming expert is not worth a slot
        for index, expert in enumerate(self._evict):
            if expert in self._cached and expert not in protected:
                del self._evict[index]
                return expert
        return None

    # -- offline hooks
    def begin_step(self, index: int, needed: Iterable[int]) -> None:
        self._now = index
        needed = set(needed)
        forced = self._cached & needed
        pool = (self._cached | needed) - forced
        ranked = sorted(pool, key=cmp_to_key(self._compare))
        keep = set(ranked[:max(0, self.capacity - len(forced))])
        self._admit = keep - self._cached
        self._evict = [e for e in reversed(ranked) if e in self._cached and e not in keep]  # furthest first

    def before_admit(self, expert: int) -> None:
        self._incoming = expert

    def _future(self, expert: int) -> tuple[list[int], int]:
        uses = self._uses.get(expert, [])
        return uses, bisect.bisect_right(uses, self._now)

    def _compare(self, a: int, b: int) -> int:
        """<0 if `a` is more worth keeping: its future uses are lexicographically earlier."""
        uses_a, i = self._future(a)
        uses_b, j = self._future(b)
        while i < len(uses_a) and j < len(uses_b):
            if uses_a[i] != uses_b[j]:
                return -1 if uses_a[i] < uses_b[j] else 1
            i, j = i + 1, j + 1
        rest_a, rest_b = len(uses_a) - i, len(uses_b) - j
        if rest_a != rest_b:  # the one with uses left is used sooner than +inf
            return -1 if rest_a > rest_b else 1
        cached_a, cached_b = a in self._cached, b in self._cached
        if cached_a != cached_b:  # identical futures: keep what is there, no needless churn
            return -1 if cached_a else 1
        return (a > b) - (a < b)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_offload.simulate ...` = `moe-offload simulate ...`."""
    from .cli import main as cli_main

    return cli_main(["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
