"""CPU expert path (moe_offload/cpu_experts.py), measured: how fast can the CPU compute routed experts straight
from the host tier, and how close are its bf16 results to an exactly accumulated oracle?

Qwen3-30B-A3B expert shapes (H=2048, I=768, bf16: 9.4 MB per expert) in a host tier of --experts experts (96 by
default: 0.9 GB, far more than any L3, so every expert a call touches comes from DRAM, as in decoding). Cases:
k = 1, 2, 4, 8, 16 experts with one token each (batch-1 decode) and 8 experts with 8 tokens each. Each strategy
times every case --reps times (median reported), effective GB/s = expert weight bytes / time, and a least-
squares fit time = a + bytes / bandwidth over the one-token cases (a: the fixed cost of a call). A tiny-expert
case (H=64, I=32, in cache) gives the fixed cost per expert (dispatch, OpenMP fork/join).

Strategies (module ones are CpuExperts configurations; the rest are bench-only alternatives):
  native/serial/tN     one expert at a time, N intra-op threads; F.linear on the bf16 tier (oneDNN)
  native/pool/W        W experts at once, each with N/W threads (fewer, with more threads each, when k < W)
  packed/...           PackedExperts: the weights re-laid out once in oneDNN's blocked format (a second copy)
  float32-blocked/...  compute="float32": weights widened to float32 in L2-sized blocks (no bf16 GEMM needed)
  float32-whole        weights widened whole before each GEMV (the float32 copy goes through DRAM)
  fp32-tier            a float32 copy of the tier (twice the bytes), F.linear in float32
  transposed           a [n, H, 2I] / [n, I, H] copy of the tier, x @ W
  split-gate-up        gate and up as two F.linear calls on the fused tier

The whole sweep runs three times: as launched, then in child processes with OMP_WAIT_POLICY=PASSIVE and with
GOMP_SPINCOUNT=10000 (see OMP_VARIANTS): how OpenMP's idle threads wait decides whether a pool of workers and
torch's own teams get in each other's way. On a shared machine other load distorts multi-threaded timings badly
(an OpenMP team waits at every barrier for its slowest thread, and spinning teams starve the rest): the report
records the load average, stops a strategy's repeats after a few seconds, and fits the minima as well.

Usage: python bench/cpu_experts_bench.py --out /tmp/cpu-experts.json [--quick] [--threads N] [--omp current]
About 35 s on 2 idle cores (3 passes; --quick about 20 s); a 16-core machine should take less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moe_offload.cpu_experts import CpuExperts, PackedExperts, packing_available  # noqa: E402
from moe_offload.environment import machine, utc_now, versions, write_report  # noqa: E402
from moe_offload.kernels.reference import weighted_expert_output  # noqa: E402

HIDDEN, INTER = 2048, 768
CASES = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (8, 8)]  # (experts, tokens per expert)
# libgomp's idle threads spin (300k spins by default) before they sleep. A spinning team steals cores from
# whatever runs next (another team, the pool's workers, the engine's own thread); sleeping costs a wake-up
# per parallel region. Each variant runs in a child process, since OpenMP reads these once, at start.
OMP_VARIANTS = {"OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
                "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    info = {"model": None, "flags": [], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] is None:
                info["model"] = value.strip()
            if key.strip() == "flags":
                info["flags"] = [f for f in FLAGS if f in value.split()]
                break
    except OSError:
        pass
    return info


def make_tier(experts: int, hidden: int, inter: int, dtype=torch.bfloat16, distinct: int = 4):
    """gate_up [n, 2I, H], down [n, H, I]: copies of a few random experts (the values do not matter for speed,
    the addresses do: every expert has its own memory)."""
    gen = torch.Generator().manual_seed(0)
    seeds_gu = (torch.randn((distinct, 2 * inter, hidden), generator=gen) * 0.02).to(dtype)
    seeds_dn = (torch.randn((distinct, hidden, inter), generator=gen) * 0.02).to(dtype)
    gate_up = torch.empty((experts, 2 * inter, hidden), dtype=dtype)
    down = torch.empty((experts, hidden, inter), dtype=dtype)
    for e in range(experts):
        gate_up[e].copy_(seeds_gu[e % distinct])
        down[e].copy_(seeds_dn[e % distinct])
    return gate_up, down


def read_bandwidth(tensor: torch.Tensor, reps: int = 3) -> float:
    """GB/s of a plain read of `tensor` (an integer max: no floating-point cost) with torch's threads."""
    flat = tensor.reshape(-1).view(torch.int64)
    flat.amax()
    best = min(_timed(flat.amax) for _ in range(reps))
    return tensor.numel() * tensor.element_size() / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- bench-only expert functions: same contract as CpuExperts.__call__, one expert at a time ---------------

def _serial(expert_fn):
    def run(hidden, weights, gate_up, down, slots, counts, out):
        start = 0
        for slot, count in zip(slots, counts):
            rows = slice(start, start + count)
            out[rows] = expert_fn(hidden[rows], weights[rows], gate_up[slot], down[slot])
            start += count
        return out
    return run


def _transposed(x, w, gate_up_t, down_t):  # gate_up_t [H, 2I], down_t [I, H]
    gate, up = (x @ gate_up_t).chunk(2, dim=-1)
    return ((F.silu(gate) * up) @ down_t) * w[:, None]


def _split(x, w, gate_up, down):
    inter = gate_up.shape[0] // 2
    return F.linear(F.silu(F.linear(x, gate_up[:inter])) * F.linear(x, gate_up[inter:]), down) * w[:, None]


def _fp32(x, w, gate_up, down):  # float32 tier: timing only (rounding points not reproduced)
    return weighted_expert_output(x.float(), w.float(), gate_up, down, F.silu)


# --- timing ---------------------------------------------------------------------------------------------

class Cursor:
    """Hands out experts round-robin over the tier, so an expert is touched again only after all others."""

    def __init__(self, n: int):
        self.n, self.next = n, 0

    def take(self, k: int) -> list[int]:
        picked = [(self.next + i) % self.n for i in range(k)]
        self.next = (self.next + k) % self.n
        return picked


def time_strategy(run, pools, cases, reps: int, warmup: int, cursor: Cursor, bytes_per_expert: int,
                  x_dtype, budget_s: float = 3.0) -> list[dict]:
    gate_up, down = pools
    inputs = {}
    for experts, tokens in cases:
        n = experts * tokens
        gen = torch.Generator().manual_seed(experts * 100 + tokens)
        inputs[(experts, tokens)] = (torch.randn((n, HIDDEN), generator=gen).to(x_dtype),
                                     torch.rand((n,), generator=gen).to(x_dtype),
                                     torch.empty((n, HIDDEN), dtype=torch.float32))
    times = {case: [] for case in cases}
    began = time.perf_counter()
    for rep in range(warmup + reps):
        for case in cases:  # cases interleaved, so a burst of load elsewhere spreads over all of them
            experts, tokens = case
            hidden, weights, out = inputs[case]
            slots = cursor.take(experts)
            elapsed = _timed(lambda: run(hidden, weights, gate_up, down, slots, [tokens] * experts, out))
            if rep >= warmup:
                times[case].append(elapsed)
        if rep >= warmup + 2 and time.perf_counter() - began > budget_s:  # a pathological strategy: enough
            break
    rows = []
    for (experts, tokens), samples in times.items():
        median = statistics.median(samples)
        nbytes = experts * bytes_per_expert
        rows.append({"experts": experts, "tokens_per_expert": tokens, "weight_bytes": nbytes, "reps": len(samples),
                     "median_s": median, "min_s": min(samples), "gb_s": nbytes / median / 1e9,
                     "per_expert_us": median / experts * 1e6})
    return rows


def fit(rows: list[dict], key: str = "median_s") -> dict:
    """time = a + b * bytes over the one-token cases (least squares)."""
    points = [(r["weight_bytes"], r[key]) for r in rows if r["tokens_per_expert"] == 1]
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    a = mean_y - b * mean_x
    return {"a_us": a * 1e6, "b_s_per_byte": b, "gb_s": 1 / b / 1e9 if b > 0 else None}


def per_expert_overhead(run, pools, reps: int) -> float:
    """Microseconds per expert for 16 tiny in-cache experts (H=64, I=32): the fixed cost of an expert."""
    gate_up, down = pools
    k, hidden = len(gate_up), 64
    x = torch.randn((k, hidden)).to(torch.bfloat16)
    w = torch.rand((k,)).to(torch.bfloat16)
    out = torch.empty((k, hidden))
    slots, counts = list(range(k)), [1] * k
    samples = []
    began = time.perf_counter()
    for rep in range(3 + reps):
        elapsed = _timed(lambda: run(x, w, gate_up, down, slots, counts, out))
        if rep >= 3:
            samples.append(elapsed)
            if len(samples) >= 3 and time.perf_counter() - began > 1.0:
                break
    return statistics.median(samples) / k * 1e6


# --- accuracy -------------------------------------------------------------------------------------------

def oracle(x, w, gate_up, down):
    """Every intermediate accumulated in float64 and rounded (via float32, like a GPU epilogue) to x's dtype at
    the points transformers' eager experts round it: the result an ideal float32 accumulation would give."""
    dtype = x.dtype

    def rnd(t):
        return t.float().to(dtype)

    gate, up = rnd(x.double() @ gate_up.double().t()).chunk(2, dim=-1)
    act = rnd(F.silu(gate.double()))
    hidden = rnd(act.double() * up.double())
    y = rnd(hidden.double() @ down.double().t())
    return (y * w[:, None]).float()


def _ulps(a: torch.Tensor, b: torch.Tensor, dtype) -> torch.Tensor:
    """Distance in units in the last place of dtype (bf16/fp16) between two float32 tensors holding dtype values."""
    def ordered(t):
        bits = t.to(dtype).view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def compare(result: torch.Tensor, reference: torch.Tensor, dtype) -> dict:
    diff = (result - reference).abs()
    ulps = _ulps(result, reference, dtype)
    return {"max_abs_diff": diff.max().item(), "max_rel_diff": (diff.max() / reference.abs().max()).item(),
            "fraction_bit_identical": (result == reference).float().mean().item(),
            "fraction_within_1_ulp": (ulps <= 1).float().mean().item()}


def accuracy_inputs(gate_up, down, tokens: int = 4):
    """Pairs for every expert of the pools (`tokens` each), their reference outputs on this CPU and the oracle's."""
    experts = gate_up.shape[0]
    gen = torch.Generator().manual_seed(1)
    n = experts * tokens
    x = torch.randn((n, HIDDEN), generator=gen).to(gate_up.dtype)
    w = torch.rand((n,), generator=gen).to(gate_up.dtype)
    reference = torch.empty((n, HIDDEN))
    exact = torch.empty((n, HIDDEN))
    for slot in range(experts):
        rows = slice(slot * tokens, (slot + 1) * tokens)
        reference[rows] = weighted_expert_output(x[rows], w[rows], gate_up[slot], down[slot], F.silu)
        exact[rows] = oracle(x[rows], w[rows], gate_up[slot], down[slot])
    return x, w, reference, exact


# --- main -----------------------------------------------------------------------------------------------

def _plain(gate_up, down):
    return gate_up, down


def _packed(gate_up, down):
    return PackedExperts(gate_up, down), None


def _transpose(gate_up, down):
    return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()


def _widen(gate_up, down):  # half the experts: the same bytes as the bf16 tier
    half = max(1, len(gate_up) // 2)
    return gate_up[:half].float(), down[:half].float()


def strategies(threads: int, quick: bool) -> list[dict]:
    """name, how to lay out the pools (prepare), how to run them, and what was configured."""
    plain = {"layout": "tier [n,2I,H]/[n,H,I]", "weight_dtype": "bfloat16"}
    specs = []

    def module(name, prepare=_plain, layout=plain, **kw):
        runner = CpuExperts(**kw)
        specs.append({"name": name, "prepare": prepare, "run": lambda *a, r=runner: r(*a[:6], out=a[6]),
                      "close": runner.close, "accuracy": True,
                      "config": {"module": True, "threads": runner.threads, "workers": runner.workers,
                                 "compute": runner.compute,
                                 "block_bytes": runner.block_bytes if runner.compute == "float32" else None,
                                 **layout}})

    def bench_only(name, fn, prepare, layout, accuracy=True):
        specs.append({"name": name, "prepare": prepare, "run": _serial(fn), "accuracy": accuracy,
                      "config": {"module": False, "threads": threads, "workers": 1, **layout}})

    module(f"native/serial/t{threads}", threads=threads)
    if threads > 2:
        module(f"native/serial/t{threads - 1}", threads=threads - 1)
    if threads >= 4:
        module(f"native/serial/t{threads // 2}", threads=threads // 2)
    workers = [w for w in (2, 4, 8, 16, 32) if w <= threads]
    if quick:
        workers = sorted({workers[0], workers[-1]}) if workers else []
    for w in workers:
        module(f"native/pool/{w}x{threads // w}", threads=threads, workers=w)
    if packing_available():
        packed = {"layout": "oneDNN-packed (opaque copy)", "weight_dtype": "bfloat16"}
        module(f"packed/serial/t{threads}", prepare=_packed, layout=packed, threads=threads)
        if workers:
            module(f"packed/pool/{workers[-1]}x{threads // workers[-1]}",
                   prepare=_packed, layout=packed, threads=threads, workers=workers[-1])
    module(f"float32-blocked/pool/{threads}x1", threads=threads, workers=threads, compute="float32")
    if not quick:
        module(f"float32-blocked/serial/t{threads}", threads=threads, compute="float32")
    module(f"float32-whole/serial/t{threads}", threads=threads, compute="float32", block_bytes=None)
    bench_only(f"transposed/serial/t{threads}", _transposed, _transpose,
               {"layout": "[n,H,2I]/[n,I,H]", "weight_dtype": "bfloat16"})
    bench_only(f"split-gate-up/serial/t{threads}", _split, _plain, plain)
    bench_only(f"fp32-tier/serial/t{threads}", _fp32, _widen,
               {"layout": "tier [n,2I,H]/[n,H,I]", "weight_dtype": "float32"}, accuracy=False)
    return specs


def measure(args) -> dict:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    reps = args.reps or (4 if args.quick else 15)
    warmup = 2
    began = time.perf_counter()

    report = {"date": utc_now(), "machine": machine(), "cpu": cpu_info(), "versions": versions(),
              "torch_num_threads": threads, "shape": {"hidden": HIDDEN, "inter": INTER, "dtype": "bfloat16"},
              "tier_experts": args.experts, "reps": reps, "warmup": warmup, "cases": CASES,
              "gb_s_means": "bf16 expert weight bytes (as the host tier holds them) / median time"}
    print(f"cpu: {report['cpu']['model']} ({os.cpu_count()} cpus, torch threads {threads}, "
          f"flags {' '.join(report['cpu']['flags'])}); load {report['cpu']['loadavg_start']}", flush=True)

    gate_up, down = make_tier(args.experts, HIDDEN, INTER)
    bytes_per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    report["bytes_per_expert"] = bytes_per_expert
    report["read_gb_s"] = read_bandwidth(gate_up)
    print(f"tier: {args.experts} experts x {bytes_per_expert / 1e6:.2f} MB; plain read {report['read_gb_s']:.1f} "
          f"GB/s (torch threads {threads})", flush=True)
    tiny = make_tier(16, 64, 32, distinct=16)
    checked = make_tier(16, HIDDEN, INTER, distinct=16)  # accuracy: 16 different experts
    acc_x, acc_w, acc_ref, acc_exact = accuracy_inputs(*checked)
    report["accuracy"] = {"pairs": acc_x.shape[0], "experts": 16, "dtype": "bfloat16",
                          "oracle": "float64 accumulation, rounded via float32 at transformers' rounding points",
                          "reference_cpu_vs_oracle": compare(acc_ref, acc_exact, torch.bfloat16)}

    results, prepared = [], {}
    for spec in strategies(threads, args.quick):
        name, run = spec["name"], spec["run"]
        if spec["prepare"] not in prepared:  # one layout at a time: strategies sharing one come in a row
            prepared.clear()
            prepared[spec["prepare"]] = tuple(spec["prepare"](*tier) for tier in ((gate_up, down), tiny, checked))
        pools, tiny_pools, checked_pools = prepared[spec["prepare"]]
        cursor = Cursor(len(pools[0]))
        rows = time_strategy(run, pools, CASES, reps, warmup, cursor, bytes_per_expert, torch.bfloat16,
                             budget_s=1.5 if args.quick else 3.0)
        overhead = per_expert_overhead(run, tiny_pools, reps * 5)
        entry = {"strategy": name, **spec["config"], "cases": rows, "fit": fit(rows), "fit_min": fit(rows, "min_s"),
                 "tiny_expert_us": overhead, "loadavg_1min_after": os.getloadavg()[0]}
        if spec["accuracy"]:
            out = run(acc_x, acc_w, *checked_pools, list(range(16)), [acc_x.shape[0] // 16] * 16,
                      torch.empty_like(acc_ref))
            entry["accuracy"] = {"vs_reference_cpu": compare(out, acc_ref, torch.bfloat16),
                                 "vs_float64_oracle": compare(out, acc_exact, torch.bfloat16)}
        if "close" in spec:
            spec["close"]()
        results.append(entry)
        cells = "  ".join(f"k{r['experts']}x{r['tokens_per_expert']} {r['median_s'] * 1e3:6.2f}ms {r['gb_s']:5.1f}"
                          for r in rows)
        f, g = entry["fit"], entry["fit_min"]
        same = entry.get("accuracy", {}).get("vs_float64_oracle", {}).get("fraction_bit_identical")
        print(f"{name:26s} {cells}  | fit a={f['a_us']:6.0f}us {f['gb_s'] or 0:5.1f}GB/s"
              f" (min: {g['a_us']:5.0f}us {g['gb_s'] or 0:5.1f})  tiny {overhead:5.1f}us/expert"
              f"  =oracle {'-' if same is None else f'{same:.4f}'}", flush=True)
    report["strategies"] = results

    best = {}
    for experts, tokens in CASES:
        name, gbs = max(((e["strategy"], c["gb_s"]) for e in results for c in e["cases"]
                         if c["experts"] == experts and c["tokens_per_expert"] == tokens), key=lambda item: item[1])
        best[f"{experts}x{tokens}"] = {"strategy": name, "gb_s": gbs}
    report["fastest_per_case"] = best
    report["cpu"]["loadavg_end"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - began
    print(f"reference on this CPU vs float64 oracle: {report['accuracy']['reference_cpu_vs_oracle']}")
    print("fastest per case: " + ", ".join(f"{k} {v['strategy']} {v['gb_s']:.1f}GB/s" for k, v in best.items()))
    print(f"elapsed {report['elapsed_s']:.1f}s; load at end {report['cpu']['loadavg_end']}")
    report["cost_model"] = cost_model(report)
    return report


def rep_cases(entry: dict, experts: int, tokens: int) -> list[dict]:
    return [c for c in entry["cases"] if c["experts"] == experts and c["tokens_per_expert"] == tokens]


def cost_model(report: dict) -> dict:
    """The CPU side of cpu_experts.CostModel from the strategy fastest at 8 one-token experts."""
    def at8(entry):
        return next(c["median_s"] for c in entry["cases"] if c["experts"] == 8 and c["tokens_per_expert"] == 1)

    module_entries = [e for e in report["strategies"] if e["module"] and e["layout"].startswith("tier")
                      and e["fit"]["b_s_per_byte"] > 0]
    if not module_entries:
        return {"strategy": None, "note": "no usable fit (timings too noisy)"}
    best = min(module_entries, key=at8)
    fit_ = best["fit"]
    return {"strategy": best["strategy"], "per_call_us": fit_["a_us"],
            "per_expert_us": fit_["b_s_per_byte"] * report["bytes_per_expert"] * 1e6,
            "gb_s": fit_["gb_s"], "formula": "t_cpu(m) = per_call + m * per_expert  (one token per expert)"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--experts", type=int, default=96, help="experts in the host tier (default 96: 0.9 GB)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads in all (default: torch's)")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per case (default 15, quick 4)")
    parser.add_argument("--quick", action="store_true", help="few repeats, fewer strategies")
    parser.add_argument("--omp", choices=("all", "current"), default="all",
                        help="all (default): this process as launched, then one child per OMP_VARIANTS entry "
                             "(OpenMP reads them when torch starts); current: this process only")
    args = parser.parse_args(argv)
    report = measure(args)
    report["omp_env"] = {key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if args.omp == "all":
        report["variants"] = {}
        for label, env in OMP_VARIANTS.items():
            if all(os.environ.get(k) == v for k, v in env.items()):
                continue
            print(f"--- again with {label} ---", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                child_out = os.path.join(tmp, "variant.json")
                child = [sys.executable, os.path.abspath(__file__), "--omp", "current", "--out", child_out,
                         "--experts", str(args.experts), "--threads", str(report["torch_num_threads"]),
                         "--reps", str(report["reps"])] + (["--quick"] if args.quick else [])
                subprocess.run(child, env=dict(os.environ, **env), check=True)
                with open(child_out) as handle:
                    report["variants"][label] = json.load(handle)
        passes = {"as launched": report, **report["variants"]}
        summary = {}
        for experts, tokens in CASES:
            name, gbs = max(((f"{e['strategy']} [{label}]", c["gb_s"]) for label, rep in passes.items()
                             for e in rep["strategies"] for c in rep_cases(e, experts, tokens)),
                            key=lambda item: item[1])
            summary[f"{experts}x{tokens}"] = {"strategy": name, "gb_s": gbs}
        report["fastest_per_case_all_variants"] = summary
        print("fastest per case, all variants: " + ", ".join(f"{k} {v['strategy']} {v['gb_s']:.1f}GB/s"
                                                            for k, v in summary.items()))
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
