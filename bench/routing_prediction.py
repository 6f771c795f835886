"""How early can a decode step's routing of layer L be known? Groundwork for a speculative prefetch.

Why: an offloaded decode step stalls when layer L's experts are not resident. If layer L's top-k set could be
predicted before layer L's router runs, the engine could start reading the predicted non-resident experts from
host RAM while the GPU still runs layer L's attention (or layer L-1). This script measures how good such
predictions are, on greedy decode (batch 1), with forward hooks on a transformers Qwen3-MoE model.

For every MoE layer L >= 1 and every step, T = layer L's true top-k set (its router on its real input, the
post-attention RMSNorm of the residual stream after layer L's attention). Predictors, each a ranking of experts:
  prev_layer_input        layer L's router on post_attention_layernorm_L(h), h = the residual stream entering
                          layer L (before its attention): known at the start of layer L.
  prev_layer_moe_input    layer L's router on post_attention_layernorm_L(r), r = the residual stream at layer
                          L-1's MoE input (after layer L-1's attention): known one full layer ahead.
  same_experts_prev_step  layer L's own ranking at the previous step (decode: the previous decode step, the first
                          one's previous step is the last prompt token; prompt: the previous prompt position).
Recall = |P_m n T| / k with P_m a predictor's top-m (m = k: fetch exactly k; m = 2k: fetch twice as many).
Random expectation: m / E. Sanity: the router recomputed from the hooked post-attention residual must reproduce
the model's own routing exactly (asserted; reported as recall 1.0).

Models: `small` = the shipped trained small-moe (float32); `random` = the random Qwen3-30B-A3B-shaped 12-layer
bf16 benchmark model of bench/common.py, written by its generate_model (spec, SEED, INIT_STD) on the CPU (a CPU
generator: the same rule and seed, but not the same draws as the H200 run, whose generator is a CUDA one);
--random-moe-intermediate shrinks the expert width (same init rule) when the full 16.2 GB does not fit.

Usage, from the repository root:
  python -m bench.routing_prediction --models small,random --random-dir /tmp/rp-full --cleanup \
      --out bench/results/<date>-routing-prediction.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

from bench import common
from bench.common import log
from moe_offload.pipeline import DEFAULT_MODEL

SCHEMA = "moe-offload/routing-prediction/1"
PREDICTORS = ("prev_layer_input", "prev_layer_moe_input", "same_experts_prev_step")
SMALL = DEFAULT_MODEL  # the shipped trained model
ENGLISH = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. From the top he "
           "could see the fishing boats returning to the harbour, their sails bright against the grey sea, and "
           "he counted them one by one until the last had safely come home.")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ----------------------------------------------------------------------------------------------- tracing


class Tracer:
    """Per MoE layer and forward call: the residual stream entering the layer, the residual stream at its MoE input
    (post_attention_layernorm's input), and the router's logits and top-k indices."""

    def __init__(self, model):
        self.layers = list(model.model.layers)
        self.moe = [i for i, layer in enumerate(self.layers) if hasattr(layer.mlp, "gate")]
        self.entering = {i: [] for i in range(len(self.layers))}
        self.moe_input = {i: [] for i in range(len(self.layers))}
        self.logits = {i: [] for i in self.moe}
        self.indices = {i: [] for i in self.moe}
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._entering(i), with_kwargs=True))
            self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._moe_input(i)))
            if i in self.moe:
                self.handles.append(layer.mlp.gate.register_forward_hook(self._gate(i)))

    def _entering(self, i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.entering[i].append(x.detach().reshape(-1, x.shape[-1]).clone())
        return hook

    def _moe_input(self, i):
        def hook(module, args):
            self.moe_input[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return hook

    def _gate(self, i):
        def hook(module, args, output):
            logits, _, indices = output
            self.logits[i].append(logits.detach().clone())
            self.indices[i].append(indices.detach().clone())
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def ranking(layer, residual: torch.Tensor, m: int) -> torch.Tensor:
    """Layer's top-m experts for residual-stream rows [n, H], ranked as its router ranks them (softmax in float32
    of its logits, then topk)."""
    normed = layer.post_attention_layernorm(residual)
    logits = F.linear(normed, layer.mlp.gate.weight)
    return torch.softmax(logits, dim=-1, dtype=torch.float).topk(m, dim=-1).indices


def logit_ranking(logits: torch.Tensor, m: int) -> torch.Tensor:
    return torch.softmax(logits, dim=-1, dtype=torch.float).topk(m, dim=-1).indices


def hits(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """|P n T| per row, P [n, m], T [n, k]."""
    return (true[:, :, None] == predicted[:, None, :]).any(-1).sum(-1)


@torch.no_grad()
def trace_generation(model, ids: torch.Tensor, steps: int) -> dict:
    """Greedy generation with `steps` decode forwards (steps + 1 new tokens); returns per layer and predictor the
    hit counts of the prompt positions and decode steps, plus the sanity check."""
    tracer = Tracer(model)
    started = time.perf_counter()
    try:
        out = model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    finally:
        tracer.remove()
    seconds = time.perf_counter() - started
    first = tracer.moe[0]
    forwards = len(tracer.indices[first])
    assert forwards == steps + 1, f"{forwards} forwards, expected {steps + 1}"
    prompt_len = ids.shape[1]
    assert tracer.indices[first][0].shape[0] == prompt_len and all(t.shape[0] == 1 for t in tracer.indices[first][1:])
    k = tracer.indices[first][0].shape[1]
    result = {"generate_s": seconds, "new_tokens": out[0, prompt_len:].tolist(), "k": k, "layers": {}}
    sanity = {"rows": 0, "exact": 0, "topk_hits": 0}
    for L in tracer.moe:
        if L == 0:
            continue
        layer = tracer.layers[L]
        true = torch.cat(tracer.indices[L])  # [P + steps, k]: prompt rows, then one row per decode step
        logits = torch.cat(tracer.logits[L])
        entering = torch.cat(tracer.entering[L])
        moe_in = torch.cat(tracer.moe_input[L])
        prev_moe_in = torch.cat(tracer.moe_input[L - 1])
        # sanity: the router on the hooked MoE input reproduces the model's routing exactly
        _, _, again = layer.mlp.gate(layer.post_attention_layernorm(moe_in))
        sanity["rows"] += true.shape[0]
        sanity["exact"] += int((again == true).all(-1).sum())
        sanity["topk_hits"] += int(hits(ranking(layer, moe_in, k), true).sum())
        ranks = {"prev_layer_input": ranking(layer, entering, 2 * k),
                 "prev_layer_moe_input": ranking(layer, prev_moe_in, 2 * k)}
        prev = logit_ranking(logits, 2 * k)  # row j predicts row j + 1 (previous position / step)
        per = {}
        for name in PREDICTORS:
            if name == "same_experts_prev_step":
                pred, target = prev[:-1], true[1:]  # row 0 (first prompt token) has no previous step
                offset = 1
            else:
                pred, target, offset = ranks[name], true, 0
            h_k = hits(pred[:, :k], target).tolist()
            h_2k = hits(pred, target).tolist()
            split = prompt_len - offset  # rows before it are prompt positions
            per[name] = {"prompt": {"topk": h_k[:split], "top2k": h_2k[:split]},
                         "decode": {"topk": h_k[split:], "top2k": h_2k[split:]}}
            assert len(h_k[split:]) == steps
        result["layers"][L] = per
    result["sanity"] = sanity
    assert sanity["exact"] == sanity["rows"] and sanity["topk_hits"] == sanity["rows"] * k, sanity
    return result


# ----------------------------------------------------------------------------------------------- aggregation


def summarise(traces: list[dict], k: int, num_experts: int) -> dict:
    """Mean recall per phase, predictor and layer, and overall (all layers L >= 1 and steps pooled)."""
    layers = sorted(traces[0]["layers"])
    out = {"baseline_random": {"topk": k / num_experts, "top2k": 2 * k / num_experts}}
    for phase in ("decode", "prompt"):
        table = {}
        for name in PREDICTORS:
            entry = {"overall": {}, "per_layer": {}, "rows_per_layer": None}
            for m in ("topk", "top2k"):
                pooled = []
                for L in layers:
                    values = [h for t in traces for h in t["layers"][L][name][phase][m]]
                    entry["per_layer"].setdefault(str(L), {})[m] = sum(values) / (k * len(values))
                    entry["rows_per_layer"] = len(values)
                    pooled += values
                entry["overall"][m] = sum(pooled) / (k * len(pooled))
            table[name] = entry
        out[phase] = table
    return out


def per_trace(trace: dict, k: int) -> dict:
    res = {}
    for name in PREDICTORS:
        for m in ("topk", "top2k"):
            values = [h for L in trace["layers"] for h in trace["layers"][L][name]["decode"][m]]
            res.setdefault(name, {})[m] = sum(values) / (k * len(values))
    return res


def markdown(model: dict) -> str:
    s = model["summary"]
    lines = [f"### {model['name']} (random top-k {s['baseline_random']['topk']:.3f}, "
             f"top-2k {s['baseline_random']['top2k']:.3f})", ""]
    layers = sorted(s["decode"][PREDICTORS[0]]["per_layer"], key=int)
    head = "| predictor | m | overall | " + " | ".join(f"L{L}" for L in layers) + " |"
    lines += [head, "|" + "---|" * (3 + len(layers))]
    for phase in ("decode", "prompt"):
        for name in PREDICTORS:
            e = s[phase][name]
            for m in ("topk", "top2k"):
                cells = " | ".join(f"{e['per_layer'][L][m]:.3f}" for L in layers)
                label = name if phase == "decode" else f"{name} (prompt)"
                lines.append(f"| {label} | {m} | {e['overall'][m]:.3f} | {cells} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- models


def small_prompts(tokenizer, count: int, length: int) -> list[dict]:
    """Held-out stdlib files of the small model's training split (it was trained on Python source), found in
    this interpreter's stdlib, plus one English paragraph; each cut to `length` tokens after an EOS prefix."""
    with open(os.path.join(SMALL, "train_log.json")) as handle:
        held = json.load(handle)["corpus"]["heldout_paths"]
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for rel in held:
        path = os.path.join(root, rel)
        if len(texts) < count and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                texts.append((f"stdlib:{rel}", handle.read(4000)))
    texts.append(("english", ENGLISH))
    prompts = []
    for source, text in texts:
        ids = tokenizer(tokenizer.eos_token + text, return_tensors="pt").input_ids[:, :length]
        assert ids.shape[1] == length, f"{source}: only {ids.shape[1]} tokens"
        prompts.append({"source": source, "ids": ids})
    return prompts


def config_facts(config) -> dict:
    return {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_experts", "num_experts_per_tok",
                                            "moe_intermediate_size", "norm_topk_prob", "vocab_size")}


def run_model(name: str, model, prompts: list[dict], steps: int, extra: dict) -> dict:
    config = model.config
    k, num_experts = config.num_experts_per_tok, config.num_experts
    traces = []
    for prompt in prompts:
        log(f"{name}: {prompt['source']}: prompt {prompt['ids'].shape[1]} tokens, {steps} decode steps")
        trace = trace_generation(model, prompt["ids"], steps)
        log(f"{name}: generate {trace['generate_s']:.1f} s, sanity {trace['sanity']}")
        traces.append(trace)
    summary = summarise(traces, k, num_experts)
    sanity = {key: sum(t["sanity"][key] for t in traces) for key in ("rows", "exact", "topk_hits")}
    sanity["recall_topk"] = sanity["topk_hits"] / (k * sanity["rows"])
    per_prompt = []
    for prompt, trace in zip(prompts, traces):
        new = trace["new_tokens"]
        per_prompt.append({"source": prompt["source"], "prompt_tokens": prompt["ids"].shape[1],
                           "new_tokens": new, "distinct_new_tokens": len(set(new)),
                           "generate_s": trace["generate_s"], "decode_recall": per_trace(trace, k)})
    report = {"name": name, **extra, "config": config_facts(config), "dtype": str(next(model.parameters()).dtype),
              "prompts": len(prompts), "decode_steps_per_prompt": steps,
              "layers_scored": sorted(traces[0]["layers"]), "sanity_true_input": sanity,
              "summary": summary, "per_prompt": per_prompt}
    return report


def load(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # exactly the asked number of tokens
    return model


def small_model(args) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(SMALL)
    model = load(SMALL, torch.float32)
    prompts = small_prompts(tokenizer, args.small_prompts, args.small_prompt_len)
    extra = {"source": os.path.abspath(SMALL), "weights": "trained (tools/train_small_moe.py), loaded as float32",
             "prompt_rule": "EOS + first tokens of held-out stdlib files (the model was trained on Python source) "
                            "and one English paragraph"}
    report = run_model("small-moe", model, prompts, args.small_steps, extra)
    report["decoded_new_text"] = {p["source"]: tokenizer.decode(p["new_tokens"]) for p in report["per_prompt"]}
    report["seconds"] = time.perf_counter() - started
    return report


def random_model(args) -> dict:
    started = time.perf_counter()
    spec = dict(common.SPECS["full"])
    if args.random_moe_intermediate:
        spec["moe_intermediate_size"] = args.random_moe_intermediate
    log(f"random: generate_model({args.random_dir}) on the CPU, spec moe_intermediate {spec['moe_intermediate_size']}")
    gen = common.generate_model(args.random_dir, spec, torch.device("cpu"))
    log(f"random: generation {gen}")
    load_started = time.perf_counter()
    model = load(args.random_dir, torch.bfloat16)
    load_s = time.perf_counter() - load_started
    log(f"random: loaded in {load_s:.1f} s, peak RSS {peak_rss_gb():.1f} GB")
    ids = common.prompt_ids(spec["vocab_size"], args.random_prompt_len)
    reduced = spec["moe_intermediate_size"] != common.SPECS["full"]["moe_intermediate_size"]
    extra = {"source": f"bench/common.py generate_model into {args.random_dir}, device cpu",
             "weights": f"every tensor its own N(0, {common.INIT_STD}) bf16 draw from torch.Generator('cpu') seeded "
                        f"{common.SEED} (common.generate_model); norm weights ones. Same rule and seed as the H200 "
                        "bench, but the H200 run draws with a CUDA generator, so the values differ",
             "moe_intermediate_reduced": reduced, "spec": spec, "model_generation": gen, "load_s": load_s,
             "prompt_rule": f"common.prompt_ids(vocab, {args.random_prompt_len}) (random ids, seed {common.SEED + 1})"}
    report = run_model("random-qwen3-30b-a3b-shape-12l" + ("-reduced" if reduced else ""), model,
                       [{"source": "common.prompt_ids", "ids": ids}], args.random_steps, extra)
    del model
    report["seconds"] = time.perf_counter() - started
    report["peak_rss_gb_process"] = peak_rss_gb()
    if args.cleanup:
        shutil.rmtree(args.random_dir)
        log(f"random: removed {args.random_dir}")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small,random", help="comma list of small, random")
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--small-prompts", type=int, default=8, help="held-out stdlib prompts (plus one English)")
    p.add_argument("--small-prompt-len", type=int, default=64)
    p.add_argument("--small-steps", type=int, default=64, help="decode forwards per prompt")
    p.add_argument("--random-dir", default="/tmp/rp-full", help="where generate_model writes the random model")
    p.add_argument("--random-moe-intermediate", type=int, default=None,
                   help="shrink the expert width (default: the spec's 768, 16.2 GB)")
    p.add_argument("--random-prompt-len", type=int, default=64)
    p.add_argument("--random-steps", type=int, default=64, help="decode forwards")
    p.add_argument("--cleanup", action="store_true", help="delete --random-dir when done")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"schema": SCHEMA, "created": common.utc_now(), "machine": common.machine(), "versions": common.versions(),
              "torch_threads": torch.get_num_threads(), "args": vars(args), "command": " ".join(sys.argv),
              "predictors": {"prev_layer_input": "layer L's router on post_attention_layernorm_L(residual entering "
                                                 "layer L, before its attention)",
                             "prev_layer_moe_input": "layer L's router on post_attention_layernorm_L(residual at "
                                                     "layer L-1's MoE input, after layer L-1's attention)",
                             "same_experts_prev_step": "layer L's router ranking at the previous step / position"},
              "metric": "mean |P_m n T| / k over rows (layers L >= 1 x steps); m = k (topk) or 2k (top2k); "
                        "decode = the decode forwards only, prompt = the prefill's positions",
              "models": []}
    for name in args.models.split(","):
        result = {"small": small_model, "random": random_model}[name](args)
        report["models"].append(result)
        print(markdown(result), flush=True)
        report["runtime_s"] = time.perf_counter() - common.STARTED
        common.write_report(args.out, report)
    log(f"done, wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
