"""Planned against peak device memory (moe_offload/budget.py): the 12-layer benchmark model loaded at several
MOE_DEVICE_MEMORY budgets (and MOE_OFFLOAD_RATIO=AUTO), each in a process of its own, running the workload the
plan bounds; the target is a peak within 5% of the plan.

Why: a plan's exact terms (weights, resident experts, KV cache, scratch) are checked on the CPU by
tests/test_budget.py against what a load allocates; its estimated terms (a prefill's activations, CUDA graphs'
pools, the CUDA runtime) only a GPU can check. Per budget this records the ratio chosen, the plan's terms, and
  allocator  torch.cuda.max_memory_allocated: tensors only, against the plan less the runtime and graphs' terms
             (graph pools hold their capture's peak as reserved, not allocated, memory once captured);
             also max_memory_reserved;
  nvml       the whole process's peak from outside (bench/sides.polled: NVML every 50 ms, less the idle reading),
             CUDA context included, against the whole plan; the plan's margin is what is left of the budget;
  runtime    NVML in use once the CUDA context, cuBLAS and a Triton kernel are loaded, before any model: what the
             plan's RUNTIME_BYTES estimates.
The workload is the plan's worst case: PREFILL_GRAPHS + 1 prompts of distinct lengths, each run twice (the
second run captures its prefill graph, as the decoder does), filling the context (prompt + new tokens =
MOE_CONTEXT), decoding fed random tokens.

It needs a CUDA GPU and cannot run on the CPU machine; run it on the GPU machine from the repository root:
  python -m bench.memory_plan --out bench/results/<date>-memory-plan.json [--budgets 6GiB,10GiB,14GiB,auto]
      [--context 4096] [--model-dir /tmp/moe-offload-bench/full]
The model (16.2 GB) is written first if the folder does not hold it (bench/common.generate_model, ~40 s on an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench.common import MODEL_ROOT, SPECS, fed_tokens, generate_model, log, prompt_ids, run_module, write_report
from bench.sides import polled

TARGET = 0.05  # |peak - plan| / plan


def child(spec: dict) -> dict:
    """One budget in this process: load, run the workload, read the allocator's peaks."""
    from moe_offload import LLMPipeline, budget
    from moe_offload.decoding import PREFILL_GRAPHS

    device = torch.device("cuda")
    properties = {"MOE_CONTEXT": spec["context"]}
    properties.update({"MOE_OFFLOAD_RATIO": "AUTO"} if spec["budget"] == "auto"
                      else {"MOE_DEVICE_MEMORY": spec["budget"]})
    pipe = LLMPipeline(spec["model"], "cuda", **properties)
    plan = pipe.memory_plan
    result = {"budget": spec["budget"], "ratio": plan.ratio, "context": plan.context, "plan": dict(plan.terms),
              "plan_total": plan.total, "choices": [c.line() for c in pipe.choices],
              "after_load_allocated": torch.cuda.memory_allocated(device)}
    vocab = pipe.model.config.get_text_config().vocab_size
    new_tokens = spec["new_tokens"]
    lengths = [plan.context - new_tokens - i for i in range(PREFILL_GRAPHS + 1)]
    for run in range(2):  # the second time a length is seen, its prefill is captured (decoding.py)
        for length in lengths:
            ids = prompt_ids(vocab, length).to(device)
            pipe.generate_tokens(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 feed=fed_tokens(vocab, new_tokens, pipe.decoder.eos_ids))
            torch.cuda.synchronize(device)
    stats = pipe.get_offload_stats()
    result.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                  peak_reserved=torch.cuda.max_memory_reserved(device),
                  cuda_graph_prefills=stats["cuda_graph_prefills"], cuda_graph_steps=stats["cuda_graph_steps"],
                  runtime_estimate=budget.RUNTIME_BYTES)
    tensors = plan.total - plan.terms["runtime"] - plan.terms["graphs"]
    result["allocator_vs_plan"] = result["peak_allocated"] / tensors - 1
    pipe.close()
    return result


def runtime_child() -> dict:
    """The CUDA runtime alone: context, a cuBLAS GEMM, a Triton kernel (what budget.RUNTIME_BYTES estimates)."""
    device = torch.device("cuda")
    a = torch.randn((256, 256), device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    try:
        from moe_offload.kernels import triton_dense

        triton_dense.rms_norm(a, torch.ones(256, device=device, dtype=torch.bfloat16), 1e-6)
    except (ImportError, AttributeError):
        pass
    torch.cuda.synchronize(device)
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}


def in_process(spec: dict, out: str, timeout: float) -> dict:
    """`spec` run by a child process of this module, its whole-process NVML peak polled from here."""
    if os.path.exists(out):
        os.remove(out)

    def command() -> dict:
        done = run_module("bench.memory_plan", ["--child", json.dumps(spec), "--out", out], capture_output=True,
                          text=True, timeout=timeout)
        return {"returncode": done.returncode, "stderr_tail": done.stderr[-2000:]}

    outcome = polled(command)
    result = {}
    if os.path.exists(out):
        with open(out) as handle:
            result = json.load(handle)
    result.update(outcome)
    if outcome["returncode"] == 0:
        result.pop("stderr_tail")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join(MODEL_ROOT, "full"))
    parser.add_argument("--budgets", default="6GiB,10GiB,14GiB,auto", help="MOE_DEVICE_MEMORY values, or auto")
    parser.add_argument("--context", type=int, default=4096, help="MOE_CONTEXT")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=240)
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a spec: run one budget in this process
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        result = runtime_child() if spec.get("runtime") else child(spec)
        with open(args.out, "w") as handle:
            json.dump(result, handle)
        return 0
    if not torch.cuda.is_available():
        log("bench.memory_plan needs a CUDA GPU: the plan's estimated terms are measured there")
        return 1
    generate_model(args.model_dir, SPECS["full"], torch.device("cuda"))
    scratch = args.out + ".part"
    runtime = in_process({"runtime": True}, scratch, args.timeout_s)
    log(f"runtime: NVML {runtime.get('peak_device_bytes')} bytes in use (plan's estimate: budget.RUNTIME_BYTES)")
    rows = []
    for value in args.budgets.split(","):
        spec = {"model": args.model_dir, "budget": value.strip(), "context": args.context,
                "new_tokens": args.new_tokens}
        row = in_process(spec, scratch, args.timeout_s)
        if row.get("peak_device_bytes") and row.get("plan_total"):
            row["nvml_vs_plan"] = row["peak_device_bytes"] / row["plan_total"] - 1
            row["within_target"] = abs(row["nvml_vs_plan"]) <= TARGET
        rows.append(row)
        log(f"{value}: ratio {row.get('ratio')}, plan {row.get('plan_total')}, NVML peak "
            f"{row.get('peak_device_bytes')}, allocator peak {row.get('peak_allocated')} "
            f"({row.get('error') or row.get('stderr_tail', '')[-200:]})")
    if os.path.exists(scratch):
        os.remove(scratch)
    write_report(args.out, {"schema": "moe-offload/memory-plan/1", "target": TARGET, "context": args.context,
                            "runtime": runtime, "budgets": rows})
    log(f"report -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
