#!/usr/bin/env python
"""Held-out cross-entropy of the shipped model with its routed experts quantized by `moe-offload quantize`,
against the bf16 original: what the weights lose, not what an engine computes.

For each configuration (bits, group size, method, symmetric or not) the checkpoint is written by the real
writer (moe_offload.quant.writer) into a temporary folder, read back with the safetensors library, its experts
dequantized by moe_offload.quant.format.dequantize (float32, exact) and put into transformers' own
Qwen3MoeForCausalLM, computing in float32 (the bf16 original is the same model with its bf16 weights). Text:
the held-out split of tools/train_small_moe.py (its `is_heldout` over this interpreter's stdlib, files
tokenized and joined with <|endoftext|> as in training), the first --max-tokens targets in windows of 512.

Where transformers can load the written folder itself (compressed-tensors decompresses it at load), its
logits on a few windows are compared with our reference in bf16 (the original bf16 model with our dequantized
experts rounded to bf16); where it cannot, the error is recorded.

    python tools/quant_accuracy.py                  # ~4 minutes on 2 CPU cores; writes bench/results/
    python tools/quant_accuracy.py --max-tokens 4096 --configs 4:64:rtn:sym --out /tmp/acc.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from moe_offload.pipeline import DEFAULT_MODEL  # noqa: E402
from moe_offload.quant.format import QuantSpec, dequantize  # noqa: E402
from moe_offload.quant.writer import quantize_checkpoint  # noqa: E402
from moe_offload.tools.environment import machine, utc_now, versions, write_report  # noqa: E402

TRAIN_SCRIPT = REPO_ROOT / "tools" / "train_small_moe.py"
SEQ_LEN = 512
# bits:group:method:sym|asym. Group 64: the largest that divides both the shipped model's in_features (hidden 256,
# expert intermediate 192); 128 does not divide 192, and compressed-tensors' readers need whole groups.
DEFAULT_CONFIGS = ("8:64:rtn:sym", "8:64:rtn:asym", "8:64:mse:sym", "8:64:mse:asym",
                   "4:64:rtn:sym", "4:64:rtn:asym", "4:64:mse:sym", "4:64:mse:asym",
                   "4:32:rtn:sym", "4:32:mse:sym")
TARGETS = {8: 0.01, 4: 0.10}  # nats over bf16 (issue 17)
CHECK_WINDOWS = 4  # windows of the transformers load comparison


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens", type=int, default=50_000, help="held-out targets evaluated (whole windows)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated bits:group:method:sym|asym")
    p.add_argument("--batch", type=int, default=8, help="windows per forward")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the 2-core machine 2 threads made the small model's forward "
                        "3.5x and the mse search 60x slower, waiting on each other)")
    p.add_argument("--out", default=None,
                   help="JSON report (default bench/results/<UTC date>-quant-accuracy-small-moe.json)")
    return p.parse_args(argv)


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_small_moe", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def heldout_windows(train, model_dir: str, max_tokens: int) -> tuple[torch.Tensor, dict]:
    """The first max_tokens // SEQ_LEN held-out windows [W, SEQ_LEN + 1], and where they came from."""
    from tokenizers import Tokenizer

    with open(os.path.join(model_dir, "train_log.json"), encoding="utf-8") as handle:
        args = json.load(handle)["args"]
    root = train.stdlib_root()
    rels = train.list_stdlib_py(root, include_tests=not args["no_tests"])
    heldout = [r for r in rels if train.is_heldout(r, args["heldout_per_mille"])]
    files, texts, skipped = train.read_texts(root, heldout)
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    stream = train.encode_docs(tokenizer, texts, tokenizer.token_to_id(train.EOS))  # [tokens]
    windows = train.eval_windows(torch.from_numpy(stream), SEQ_LEN)  # [N, SEQ_LEN + 1]
    used = windows[: max(1, max_tokens // SEQ_LEN)]
    return used, {"stdlib": str(root), "split": f"tools/train_small_moe.py is_heldout, {args['heldout_per_mille']} "
                  "per mille of files by path hash", "heldout_files": len(files), "skipped_files": skipped,
                  "heldout_tokens": int(stream.size), "windows": int(used.shape[0]), "seq_len": SEQ_LEN,
                  "tokens_evaluated": int(used.shape[0] * SEQ_LEN)}


def parse_config(text: str) -> tuple[QuantSpec, str]:
    bits, group, method, zero = text.split(":")
    if zero not in ("sym", "asym"):
        raise SystemExit(f"bad config {text!r}: the last field is sym or asym")
    return QuantSpec(int(bits), int(group), zero == "sym"), method


def read_experts(folder: str, spec: QuantSpec, layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer the dequantized gate_up [E, 2I, H] and down [E, H, I] (float32) of the checkpoint in `folder`,
    read with the safetensors library (not with the writer's own code)."""
    tensors = {}
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})

    def weight(module: str) -> torch.Tensor:
        parts = {name.rsplit(".", 1)[1]: t for name, t in tensors.items() if name.startswith(module + ".weight_")}
        return dequantize(parts, spec, module)

    gate_ups, downs = [], []
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = sorted({int(name[len(prefix) + 1:].split(".")[0]) for name in tensors if name.startswith(prefix)})
        gate_ups.append(torch.stack([torch.cat([weight(f"{prefix}.{e}.gate_proj"), weight(f"{prefix}.{e}.up_proj")])
                                     for e in experts]))  # [E, 2I, H]
        downs.append(torch.stack([weight(f"{prefix}.{e}.down_proj") for e in experts]))  # [E, H, I]
    return gate_ups, downs


def set_experts(model, gate_ups: list[torch.Tensor], downs: list[torch.Tensor]) -> None:
    """Copy per-layer expert weights into the model's fused parameters (rounded to their dtype)."""
    with torch.no_grad():
        for layer, gate_up, down in zip(model.model.layers, gate_ups, downs):
            layer.mlp.experts.gate_up_proj.copy_(gate_up)
            layer.mlp.experts.down_proj.copy_(down)


def relative_error(gate_ups, downs, originals) -> float:
    """||W_q - W|| / ||W|| over every expert weight of the model."""
    err = ref = 0.0
    for new, old in zip(gate_ups + downs, [g for g, _ in originals] + [d for _, d in originals]):
        err += float((new.double() - old.double()).square().sum())
        ref += float(old.double().square().sum())
    return (err / ref) ** 0.5


def window_nll(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window [W], float64. Windows are equally long,
    so their mean is the per-token cross-entropy, and paired differences per window give its standard error."""
    out = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            win = windows[start:start + batch].long()  # [B, T + 1]
            logits = model(input_ids=win[:, :-1], use_cache=False).logits.float()  # [B, T, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), win[:, 1:], reduction="none")  # [B, T]
            out.append(nll.double().mean(dim=1))
    return torch.cat(out)


def transformers_check(folder: str, reference, windows: torch.Tensor) -> dict:
    """Load `folder` with transformers (compressed-tensors decompresses it at load) and compare its logits with
    `reference` (bf16, our dequantized experts) on a few windows. A failed load is recorded with the first
    error line transformers logged about it (its exception only points at its log)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    logged = _Captured()
    hf_logging.disable_default_handler()  # its load report goes to `logged`, not to the terminal
    hf_logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(logged)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    except Exception as err:  # noqa: BLE001 - what transformers says is the finding
        causes = [line.strip() for line in logged.text().splitlines() if re.match(r"\s*\w+Error: ", line)]
        return {"loads": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}",
                "cause": causes[0] if causes else None}
    finally:
        logging.getLogger("transformers").removeHandler(logged)
        hf_logging.set_verbosity_error()
        hf_logging.enable_default_handler()
    x = windows[:CHECK_WINDOWS, :-1].long()
    with torch.no_grad():
        ours, theirs = reference(input_ids=x).logits.float(), loaded(input_ids=x).logits.float()
    return {"loads": True, "windows": int(x.shape[0]), "tokens": int(x.numel()),
            "max_abs_logit_diff": float((ours - theirs).abs().max()), "bit_identical": bool(torch.equal(ours, theirs))}


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[str] = []

    def emit(self, record) -> None:
        self.records.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.records)


def main(argv=None) -> None:
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    started = time.time()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train = load_train_module()
    windows, corpus = heldout_windows(train, args.model, args.max_tokens)
    print(f"{corpus['tokens_evaluated']:,} held-out tokens ({corpus['windows']} windows) of "
          f"{corpus['heldout_files']} files", flush=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    originals = [(layer.mlp.experts.gate_up_proj.detach().clone(), layer.mlp.experts.down_proj.detach().clone())
                 for layer in model.model.layers]
    base_nll = window_nll(model, windows, args.batch)  # [W]
    base = float(base_nll.mean())
    print(f"bf16 original: {base:.4f} nats/token", flush=True)
    results = []
    for text in args.configs.split(","):
        spec, method = parse_config(text)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "quantized")
            summary = quantize_checkpoint(args.model, folder, spec, method)
            gate_ups, downs = read_experts(folder, spec, len(model.model.layers))
            set_experts(model, gate_ups, downs)
            delta_nll = window_nll(model, windows, args.batch) - base_nll  # [W], paired with the original
            set_experts(reference, gate_ups, downs)
            check = transformers_check(folder, reference, windows)
        set_experts(model, *zip(*originals))
        set_experts(reference, *zip(*originals))
        delta = float(delta_nll.mean())
        delta_se = float(delta_nll.std() / delta_nll.numel() ** 0.5)
        row = {"config": text, "bits": spec.bits, "group_size": spec.group_size, "method": method,
               "symmetric": spec.symmetric, "ce_nats": round(base + delta, 5), "delta_nats": round(delta, 5),
               "delta_se_nats": round(delta_se, 5), "target_delta_nats": TARGETS[spec.bits],
               "meets_target": delta <= TARGETS[spec.bits],
               "relative_weight_error": round(relative_error(list(gate_ups), list(downs), originals), 5),
               "expert_bytes": summary["expert_bytes_out"], "expert_bytes_bf16": summary["expert_bytes_in"],
               "transformers_load": check, "seconds": round(time.time() - t0, 1)}
        results.append(row)
        print(f"{text:>14}: {base + delta:.4f} nats ({delta:+.4f} +- {delta_se:.4f}), weight error "
              f"{row['relative_weight_error']:.4f}, transformers: {check}", flush=True)
    report = {"what": "held-out cross-entropy of the shipped model, routed experts quantized by moe-offload "
                      "quantize and dequantized by moe_offload.quant.format.dequantize, in transformers' "
                      "Qwen3MoeForCausalLM (float32 compute); delta_se_nats: standard error of the mean over "
                      "windows of the per-window difference from the original",
              "date": utc_now(), "machine": machine(),
              "versions": {**versions(), "compressed_tensors": compressed_tensors.__version__},
              "model": os.path.relpath(args.model, REPO_ROOT), "corpus": corpus,
              "bf16_ce_nats": round(base, 5), "results": results, "wall_s": round(time.time() - started, 1)}
    out = args.out or str(REPO_ROOT / "bench" / "results" / f"{utc_now()[:10]}-quant-accuracy-small-moe.json")
    write_report(out, report)
    print(f"wrote {out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
