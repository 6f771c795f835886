"""What the bench scripts share: the random benchmark model, its workload, generation timing, pipeline loading,
the report writer, and how a script starts a worker process of itself.

The scripts are modules of the `bench` package, run from the repository root: `python -m bench.<script> ...`.

The benchmark model: a random Qwen3-30B-A3B-shaped checkpoint with 12 layers (hidden 2048, 128 experts, top-8,
expert intermediate 768, 32 heads, 4 kv heads, head_dim 128, vocab 151936, bf16, 16.2 GB) written by
generate_model as hub-style safetensors shards (one per layer, per-expert `experts.E.{gate,up,down}_proj.weight`
keys, an index), one shard in memory at a time. Every tensor is its own N(0, 0.02) draw from a seeded generator
(no block reused); norm weights are ones, as transformers initialises them. The draws depend on the generator's
device: a model written on a GPU and one written on a CPU follow the same rule and seed, not the same values.
Its routing is random-weight routing, not a trained model's (see bench/RESULTS.md).

Its quantized copies (issue 17): quantize_model runs the project's own `moe-offload quantize` on it into a sibling
folder (MODEL-int4, MODEL-int8: quantized_dir), in a process of its own, so that what is timed and what the
process's peak RSS shows is the command a user runs, which streams one expert matrix at a time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network; never wait on the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from moe_offload.checkpoint import Checkpoint  # noqa: E402
from moe_offload.config import DIAGNOSTICS  # noqa: E402
from moe_offload.tools.benchmark import GenerationTimer  # noqa: E402
from moe_offload.tools.environment import machine, utc_now, versions, write_report  # noqa: E402, F401
from moe_offload.tools.info import describe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
MODEL_ROOT = "/tmp/moe-offload-bench"  # <MODEL_ROOT>/full: the model every GPU script and llama.cpp's side share
STARTED = time.perf_counter()
GB = 1e9
SEED = 0
INIT_STD = 0.02
SPECS = {
    "full": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                 num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                 num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, bos_token_id=151643,
                 eos_token_id=151645, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
                 norm_topk_prob=True, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                 tie_word_embeddings=False),
}


def log(message: str) -> None:
    """A line with the seconds since the script started."""
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_module(module: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, in this interpreter (a worker process of a script)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, **kwargs)


# ----------------------------------------------------------------------------------------------- the model


def hf_config(spec: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(dtype="bfloat16", **spec)


def hub_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor Qwen3MoeForCausalLM.save_pretrained writes: the meta model's state_dict, with
    transformers' fused experts [E, 2I, H] / [E, H, I] split into per-expert hub keys."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = []
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name.endswith(".experts.gate_up_proj") and len(shape) == 3:
            prefix, (experts, two_inter, hidden) = name[: -len("gate_up_proj")], shape
            for e in range(experts):
                out += [(f"{prefix}{e}.gate_proj.weight", (two_inter // 2, hidden)),
                        (f"{prefix}{e}.up_proj.weight", (two_inter // 2, hidden))]
        elif name.endswith(".experts.down_proj") and len(shape) == 3:
            prefix = name[: -len("down_proj")]
            out += [(f"{prefix}{e}.down_proj.weight", shape[1:]) for e in range(shape[0])]
        else:
            out.append((name, shape))
    return out


def _shard_of(name: str) -> int:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else 0  # shard 0: embeddings, final norm, lm_head


def _write_shard(path: str, entries, device: torch.device, generator: torch.Generator) -> int:
    """One shard's tensors drawn as one buffer on `device` (fast on a GPU), saved as views of it."""
    from safetensors.torch import save_file

    sizes = [torch.Size(shape).numel() for _, shape in entries]
    buffer = torch.empty(sum(sizes), dtype=torch.bfloat16, device=device)
    buffer.normal_(0.0, INIT_STD, generator=generator)
    offset, spans = 0, []
    for (name, shape), size in zip(entries, sizes):
        if len(shape) == 1 and name.endswith("norm.weight"):
            buffer[offset:offset + size].fill_(1.0)
        spans.append((name, shape, offset, size))
        offset += size
    host = buffer.cpu()
    del buffer
    tensors = {name: host[o:o + s].view(shape) for name, shape, o, s in spans}
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except RuntimeError:  # an older safetensors that refuses views of one storage: give each its own
        save_file({k: v.clone() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back now, so later disk measurements do not compete with writeback
    finally:
        os.close(fd)
    return host.numel() * 2


def generate_model(path: str, spec: dict, device: torch.device) -> dict:
    """Write the random model of `spec` into `path`; skipped when the folder already holds the same model
    (bench_model.json)."""
    marker = os.path.join(path, "bench_model.json")
    wanted = {"spec": spec, "seed": SEED, "init_std": INIT_STD}
    if os.path.isfile(marker):
        with open(marker) as handle:
            if json.load(handle).get("identity") == wanted:
                return {"generated": False, "seconds": 0.0}
    started = time.perf_counter()
    os.makedirs(path, exist_ok=True)
    config = hf_config(spec)
    config.save_pretrained(path)
    by_shard: dict[int, list] = {}
    for name, shape in hub_tensors(config):
        by_shard.setdefault(_shard_of(name), []).append((name, shape))
    generator = torch.Generator(device=device).manual_seed(SEED)
    count, weight_map, total = len(by_shard), {}, 0
    for index, shard in enumerate(sorted(by_shard)):
        file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        total += _write_shard(os.path.join(path, file), by_shard[shard], device, generator)
        weight_map.update({name: file for name, _ in by_shard[shard]})
        log(f"gen: {file} ({total / GB:.1f} GB so far)")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=1)
    with open(marker, "w") as handle:  # last: a folder without it is regenerated
        json.dump({"identity": wanted, "bytes": total}, handle)
    seconds = time.perf_counter() - started
    return {"generated": True, "seconds": seconds, "bytes": total, "write_gb_s": total / seconds / GB}


def quantized_dir(path: str, weights: str) -> str:
    """The folder holding the random model at `path` in `weights`: the model itself for bf16, else the sibling
    quantize_model or fp8_model writes (PATH-int4, PATH-int8, PATH-fp8)."""
    return path if weights == "bf16" else f"{path.rstrip(os.sep)}-{weights}"


def _run_measured(command: list[str]) -> tuple[int, str, int]:
    """(exit status, output, peak RSS in bytes) of `command` run from the repository root: os.wait4 gives that one
    child's own peak, which getrusage(RUSAGE_CHILDREN) would mix with every earlier child's."""
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        return child.returncode, output.read(), usage.ru_maxrss * 1024  # Linux: kilobytes


def quantize_model(source: str, out: str, bits: int, group_size: int, method: str) -> dict:
    """`moe-offload quantize SOURCE -o OUT --bits B --group-size G --method M` in a process of its own, timed with
    its peak RSS (_quantized_copy)."""
    command = ["-m", "moe_offload.cli", "quantize", source, "-o", out, "--bits", str(bits), "--group-size",
               str(group_size), "--method", method]
    return _quantized_copy(source, out, {"bits": bits, "group_size": group_size, "method": method}, command,
                           "moe-offload quantize")


def fp8_model(source: str, out: str) -> dict:
    """The FP8 block-quantized checkpoint of SOURCE (bench/fp8_checkpoint.py) in a process of its own, timed with
    its peak RSS (_quantized_copy)."""
    from bench.fp8_checkpoint import BLOCK

    command = ["-m", "bench.fp8_checkpoint", source, out]
    return _quantized_copy(source, out, {"fp8_block": list(BLOCK)}, command, "bench.fp8_checkpoint")


def _quantized_copy(source: str, out: str, how: dict, command: list[str], label: str) -> dict:
    """Run `python COMMAND` (`label`: it writes OUT from SOURCE), timed with its peak RSS; skipped when OUT already
    holds that quantization (`how`) of that model (bench_quant.json, written last). A stale OUT is removed only if
    it is a copy of a random model (both writers copy bench_model.json along): any other folder there is refused."""
    marker = os.path.join(out, "bench_quant.json")
    with open(os.path.join(source, "bench_model.json")) as handle:
        wanted = {"source": json.load(handle)["identity"], **how}
    if os.path.isfile(marker):
        with open(marker) as handle:
            if json.load(handle).get("identity") == wanted:
                return {"quantized": False, "seconds": 0.0}
    if os.path.exists(out):
        if not os.path.isfile(os.path.join(out, "bench_model.json")):
            raise RuntimeError(f"{out} exists and is not a quantized random model: move it away")
        shutil.rmtree(out)
    command = [sys.executable, *command]
    started = time.perf_counter()
    status, output, peak_rss = _run_measured(command)
    seconds = time.perf_counter() - started
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if status != 0:
        raise RuntimeError(f"{label} exit {status}: {lines[-1] if lines else 'no output'}")
    with open(marker, "w") as handle:
        json.dump({"identity": wanted}, handle)
    return {"quantized": True, "seconds": seconds, "peak_rss_bytes": peak_rss, "summary": lines[-1],
            "command": "python " + " ".join(command[1:])}


def shard_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def model_facts(path: str) -> dict:
    info = describe(Checkpoint(path))
    with open(os.path.join(path, "config.json")) as handle:
        config = json.load(handle)
    files = shard_files(path)
    embed = config["vocab_size"] * config["hidden_size"] * 2
    return {
        "path": os.path.abspath(path), "config": config,
        "file_bytes": sum(os.path.getsize(f) for f in files), "files": len(files),
        "non_expert_bytes": info["non_expert_bytes"], "input_embedding_bytes": embed,
        "expert_bytes": info["layers"][0]["expert_bytes"], "experts_per_layer": info["layers"][0]["experts"],
        "expert_bytes_total": info["expert_bytes_total"], "moe_layers": info["moe_layers"],
        "experts_per_token": info["experts_per_token"], "staging_bytes": info["staging_bytes"],
        "kv_bytes_per_token": 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 2,
        "weights": f"every tensor its own N(0, {INIT_STD}) bf16 draw (seed {SEED}); norm weights ones",
        "quantization": info["quantization"],  # the routed experts' (bits, group size, format); None at bf16
    }


# ----------------------------------------------------------------------------------------------- the workload


def prompt_ids(vocab: int, length: int) -> torch.Tensor:
    return torch.randint(2, vocab, (1, length), generator=torch.Generator().manual_seed(SEED + 1))  # [1, P]


def fed_tokens(vocab: int, count: int, avoid: list[int]) -> torch.Tensor:
    """[count] random token ids to decode in place of greedy picks (as llama-bench's tg test feeds random ones),
    none of them in `avoid` (EOS: a fed EOS would end the generation)."""
    tokens = torch.randint(2, vocab, (count,), generator=torch.Generator().manual_seed(SEED + 2))
    for banned in avoid:
        tokens[tokens == banned] = 2 if banned != 2 else 3
    return tokens


# ----------------------------------------------------------------------------------------------- loading, timing


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_pipeline(path: str | None, device: str, **settings):
    """LLMPipeline(path, device, **properties), where `settings` may also hold diagnostic switches (MOE_KERNEL,
    MOE_ZERO_COPY, MOE_CUDA_GRAPH, MOE_FUSE_DENSE, MOE_IO: docs/diagnostics.md): those are set in the environment
    for the load, which is when the pipeline reads them, and restored after."""
    from moe_offload import LLMPipeline

    switches = {key: str(value) for key, value in settings.items() if key.upper() in DIAGNOSTICS}
    properties = {key: value for key, value in settings.items() if key not in switches}
    with _environment(switches):
        return LLMPipeline(path, device, **properties)


def _deadline_criteria(deadline: float):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), time.perf_counter() > deadline, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([Deadline()])


def timed_generate(model, ids: torch.Tensor, new_tokens: int, device: torch.device, deadline: float,
                   after_prefill=None, pipe=None, feed: torch.Tensor | None = None) -> dict:
    """One greedy generation of `new_tokens` from the prompt `ids` [1, P], timed by token arrival (GenerationTimer,
    as `moe-offload bench` times): through the pipeline's own decoding (static cache, CUDA graphs where possible)
    when `pipe` is given, else transformers' generate with a stopping criterion at `deadline` (the baselines, which
    can be slow). `feed` [>= new_tokens] (pipe only): tokens decoded in place of the greedy picks.
    `after_prefill` is called once the prefill is done, before any decode step.

    TTFT = call to first token; prefill tok/s = P / TTFT, the whole wait a user sees (llama-bench's pp test times
    the whole prompt too), the same rule whether the prefill ran eagerly or replayed a graph; decode tok/s = (new
    tokens - 1) / (last token - first token)."""
    timer = GenerationTimer(model, lambda: sync(device), after_prefill)
    eos = model.generation_config.eos_token_id
    sync(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if pipe is not None:
                produced = int(pipe.generate_tokens(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, streamer=timer, feed=feed).numel())
            else:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, streamer=timer,
                                     pad_token_id=eos[0] if isinstance(eos, list) else eos,
                                     stopping_criteria=_deadline_criteria(deadline))
                produced = int(out.shape[1] - ids.shape[1])
    finally:
        timer.detach()
    stamps = timer.token_times
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    ttft = stamps[0] - start
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": produced, "ttft_s": ttft,
            "prefill_tok_s": ids.shape[1] / ttft, "decode_steps": len(stamps) - 1,
            "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s else None}
