"""One configuration of the harness (bench/harness.py), measured in a process of its own: ours (LLMPipeline at one
ratio with one set of properties) or a baseline (transformers all on the device, accelerate device_map="auto").

Why a process each: the harness reads the GPU's memory in use from outside (NVML), the same way for llama.cpp's
processes, so every peak is a whole process's with its CUDA context; and no configuration inherits another's
compiled kernels, graphs or allocator state.

Ours, in order (each generation with fresh random tokens; its prompt length decides what the pipeline has seen):
  cold         two short prompts (P/2, P/2 + 1 tokens), each decoding as many tokens as a measured generation: the
               process's first generations, which compile kernels and capture the decode graph (the decoder captures
               it at a generation's third token) or record its piecewise segments (kept in the file, in no table);
  first_seen   prompts of P, P+1, ... P+R-1 tokens, each a length never run before: an eager prefill, with any
               compile or capture a user pays for a new length (two lengths of the cold phase, of both parities,
               already compiled what a server would have compiled by then);
  second_seen  the same lengths again: the pipeline captures each one's prefill graph (decoding.py); prefill
               counters (experts touched, bytes) are read here, after the prefill, outside any reported timing;
  replayed     R prompts of P tokens, then `decode_tokens` decode steps each fed a fresh random token (a different
               draw per repeat, as llama-bench's tg test): the replayed prefill and the decode figures.
Counters are reset after each prefill, so a generation's decode counters are decode-only.
The results file (spec["out"]) is rewritten after every generation, so a process stopped at its deadline keeps
what it measured.

Usage (the harness runs it): python -m bench.worker '<spec JSON>'
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from bench.bandwidth import drop_page_cache
from bench.common import STARTED, load_pipeline, shard_files, sync, timed_generate, write_report
from moe_offload.config import DIAGNOSTICS

FIRST_SEEN_TOKENS = 2  # new tokens after a first- or second-seen prefill: only the prefill is measured there


class RandomWorkload:
    """Fresh random token ids for every prompt and every decode step, a new draw at each call, reproducible from the
    seed: llama-bench draws a random prompt for its pp test and a random token for each step of its tg test. Ids
    0-1 and EOS are never drawn (a fed EOS would end a generation early)."""

    def __init__(self, vocab: int, avoid: list[int], seed: int):
        self.vocab, self.avoid = vocab, avoid
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, count: int) -> torch.Tensor:
        tokens = torch.randint(2, self.vocab, (count,), generator=self.generator)  # [count]
        for banned in self.avoid:
            tokens[tokens == banned] = 2 if banned != 2 else 3
        return tokens

    def prompt(self, length: int) -> torch.Tensor:
        return self._draw(length)[None]  # [1, length]

    def feed(self, count: int) -> torch.Tensor:
        return self._draw(count)  # [count]


class TraceWorkload(RandomWorkload):
    """RandomWorkload's tokens, with our pipeline's routing replaced by the trained 128-expert model's recorded
    routing (bench/routing_replay.py): attach() once the pipeline is loaded, start() before each generation."""

    def __init__(self, vocab: int, avoid: list[int], seed: int):
        super().__init__(vocab, avoid, seed)
        self.seed, self.replay = seed, None

    def attach(self, pipe) -> None:
        from bench.routing_replay import RoutingReplay, learned_stream

        self.replay = RoutingReplay(pipe, learned_stream(), self.seed)

    def start(self, tokens: int) -> None:
        self.replay.reset(tokens)


# What drives prompts and decode steps: prompt()/feed() tokens; attach(pipe)/start(tokens) where it also routes.
WORKLOADS = {"random": RandomWorkload, "trace": TraceWorkload}


def _eos(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _counters(stats: dict) -> dict:
    """The routing-dependent counters of one prefill or one decode (get_offload_stats since the last reset)."""
    return {"hits": stats["hits"], "misses": stats["misses"], "hit_rate": stats["hit_rate"],
            "host_bytes": stats["bytes_streamed"]["host"], "disk_bytes": stats["bytes_streamed"]["disk"],
            "in_place_bytes": stats["bytes_read_in_place"], "cpu_experts": stats["experts_computed_on_cpu"]}


def _allocator_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _judge_cpu_share_again(pipe, result: dict) -> None:
    """Where a workload replaced the routing after the load (trace), MOE_CPU_EXPERTS=auto's whole-decode check is
    made again under it (hybrid.check_again) and the run's MOE_CPU_EXPERTS choice says what it came to: the load
    judged the CPU path on the random model's own routing, which repeats far more than the replayed one."""
    from moe_offload import hybrid

    if pipe.device.type != "cuda":
        return
    prompt = hybrid.check_prompt(pipe.model.config.get_text_config().vocab_size).to(pipe.device)
    check = hybrid.check_again(pipe.decoder, pipe.layers, prompt)
    if check is None:
        return
    pipe.reset_offload_stats()
    rates = check["decode_tok_s"]
    for choice in result["choices"]:
        if choice["name"] == "MOE_CPU_EXPERTS":
            at_load = f"{choice['value']} at load ({choice['why']})"
            choice.update(value="on" if check["kept"] else "off",
                          why=f"judged again on the replayed routing: decode {rates['on']:.1f} tok/s with the CPU "
                              f"share, {rates['off']:.1f} without; {at_load}")


def measure_ours(spec: dict, result: dict, save, deadline: float) -> None:
    device = torch.device(spec["device"])
    files = shard_files(spec["model_dir"])
    disk = spec["tier"] == "disk"
    if disk:  # the disk tier's misses must come from the disk, not the page cache
        drop_page_cache(files)
    # a variant's diagnostic switches (config.DIAGNOSTICS, e.g. MOE_CACHE_POLICY) go to this process's environment
    properties = {k: v for k, v in spec["properties"].items() if k not in DIAGNOSTICS}
    os.environ.update({k: str(v) for k, v in spec["properties"].items() if k in DIAGNOSTICS})
    started = time.perf_counter()
    pipe = load_pipeline(spec["model_dir"], spec["device"], MOE_OFFLOAD_RATIO=spec["ratio"], **properties)
    try:
        result.update(load_s=time.perf_counter() - started, config=dataclasses.asdict(pipe.config),
                      choices=[dataclasses.asdict(c) for c in pipe.choices],
                      expert_bytes=pipe.get_offload_stats()["expert_bytes"])
        save()
        vocab = pipe.model.config.get_text_config().vocab_size
        workload = WORKLOADS[spec["workload"]](vocab, _eos(pipe.model), spec["seed"])
        if hasattr(workload, "attach"):
            workload.attach(pipe)
            _judge_cpu_share_again(pipe, result)
        P, R = spec["prompt_tokens"], spec["repeats"]

        def generate(length: int, new_tokens: int, read_prefill: bool) -> dict:
            if disk:
                drop_page_cache(files)
            ids, feed = workload.prompt(length).to(device), workload.feed(new_tokens)
            if hasattr(workload, "start"):
                workload.start(length + new_tokens)
            prefill: dict = {}

            def after_prefill():
                prefill["graph"] = bool(pipe.decoder and pipe.decoder.prefills_replayed)  # a plain int: no sync
                if read_prefill:
                    prefill.update(_counters(pipe.get_offload_stats()))
                pipe.reset_offload_stats()

            pipe.reset_offload_stats()
            run = timed_generate(pipe.model, ids, new_tokens, device, deadline, after_prefill, pipe=pipe, feed=feed)
            run.update(prefill=prefill, decode=_counters(pipe.get_offload_stats()))
            return run

        plan = (("cold", [(P // 2, spec["decode_tokens"]), (P // 2 + 1, spec["decode_tokens"])], False),
                ("first_seen", [(P + r, FIRST_SEEN_TOKENS) for r in range(R)], False),
                ("second_seen", [(P + r, FIRST_SEEN_TOKENS) for r in range(R)], True),
                ("replayed", [(P, spec["decode_tokens"])] * R, False))
        for phase, generations, read_prefill in plan:
            result[phase] = []
            for length, new_tokens in generations:
                if time.perf_counter() > deadline:
                    result["cut_short"] = f"deadline reached in phase {phase}"
                    return
                result[phase].append(generate(length, new_tokens, read_prefill))
                save()
        stats = {k: v for k, v in pipe.get_offload_stats().items() if k != "per_layer"}
        # as JSON holds them: an entry the engine adds later in a type JSON lacks is kept as its text
        result.update(stats=json.loads(json.dumps(stats, default=str)),
                      allocator_peak_device_bytes=_allocator_peak(device))
    finally:
        pipe.close()


def measure_baseline(spec: dict, result: dict, save, deadline: float) -> None:
    """transformers' own model: all on the device (grouped_mm experts), or accelerate's device_map="auto" within
    spec["gpu_bytes"] of device memory. One warm-up generation, then `repeats` with fresh prompts; greedy decode
    (transformers' generate takes no fed tokens; with every weight where it lies for the whole run, routing does
    not change these timings)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec["kind"] == "transformers":
        kwargs = dict(device_map=str(device), experts_implementation=spec["experts"])
    else:
        kwargs = dict(device_map="auto", max_memory={0: spec["gpu_bytes"], "cpu": "120GiB"})
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, **kwargs).eval()
    placement = getattr(model, "hf_device_map", None) or {}
    result.update(load_s=time.perf_counter() - started,
                  experts_implementation=getattr(model.config, "_experts_implementation", None),
                  device_map_counts={str(d): sum(1 for v in placement.values() if v == d)
                                     for d in set(placement.values())})
    save()
    workload = WORKLOADS[spec["workload"]](model.config.vocab_size, _eos(model), spec["seed"])
    P = spec["prompt_tokens"]
    result["warm_up"] = timed_generate(model, workload.prompt(P).to(device), 2, device, deadline)
    result["runs"] = []
    for _ in range(spec["repeats"]):
        if time.perf_counter() > deadline:
            result["cut_short"] = "deadline reached"
            break
        result["runs"].append(timed_generate(model, workload.prompt(P).to(device), spec["decode_tokens"], device,
                                             deadline))
        save()
    sync(device)
    result["allocator_peak_device_bytes"] = _allocator_peak(device)


MEASURES = {"ours": measure_ours, "transformers": measure_baseline, "accelerate": measure_baseline}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.worker '<spec JSON>' (bench/harness.py writes the spec)", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    if spec["device"] == "cpu":
        torch.set_num_threads(1)  # tiny GEMMs gain nothing from threads, and spinning ones stall on a busy CPU
    result: dict = {"kind": spec["kind"]}

    def save() -> None:
        write_report(spec["out"], result)

    MEASURES[spec["kind"]](spec, result, save, STARTED + spec["seconds"])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
