"""Does a GGUF from convert_qwen3moe_gguf.py compute what transformers computes on the same checkpoint?

Why: llama-bench only times the model; a wrong layout (a transposed or swapped expert projection, a missing norm)
would time the same and compute garbage. This runs greedy_ids.cpp (llama.cpp's C API, built against build.sh's
libllama) and transformers in float32 on one prompt of token ids, then compares the greedy ids and the logits at every
position (transformers fed llama.cpp's ids, so one early flip does not hide the rest). llama.cpp runs with an F32 KV
cache and, by default, no flash attention: an F32 GGUF then matches transformers to float32 rounding (seen: 3e-7
relative L2 on the tiny model); a BF16 GGUF on the CPU rounds activations to bf16 in its matrix products (seen: 3e-3).

Usage: python -m bench.llamacpp.check_gguf MODEL_DIR MODEL.gguf --llama-cpp DIR/llama.cpp --build DIR/build-cpu
       [--prompt-len 12] [--new 8] [--ngl 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def build_tool(src: str, build: str) -> str:
    exe = os.path.join(build, "bin", "greedy_ids")
    source = os.path.join(HERE, "greedy_ids.cpp")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(source):
        lib = os.path.join(build, "bin")
        subprocess.run(["g++", "-O2", "-std=c++17", source, "-I", os.path.join(src, "include"), "-I",
                        os.path.join(src, "ggml", "include"), "-L", lib, "-lllama", f"-Wl,-rpath,{lib}", "-o", exe],
                       check=True)
    return exe


def llama_greedy(exe: str, gguf: str, ids: list[int], new: int, ngl: int, fa: str) -> tuple[list[int], np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "logits.f32")
        out = subprocess.run([exe, gguf, ",".join(map(str, ids)), str(new), path, str(ngl), fa], check=True,
                             capture_output=True, text=True).stdout
        generated = [int(x) for x in out.split("ids:")[1].strip().split(",")]
        logits = np.fromfile(path, dtype=np.float32)
    return generated, logits.reshape(len(ids) + new - 1, -1)


def hf_greedy(model_dir: str, ids: list[int], new: int, forced: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(logits.argmax()))
        teacher = torch.tensor([ids + forced[:-1]])
        logits = model(teacher).logits[0].float().numpy()
    return sequence[len(ids):], logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("gguf")
    parser.add_argument("--llama-cpp", required=True, help="the source tree (build.sh's DIR/llama.cpp)")
    parser.add_argument("--build", required=True, help="build.sh's DIR/build-cpu or DIR/build-cuda")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--ngl", type=int, default=0, help="llama.cpp layers on the GPU")
    parser.add_argument("--fa", choices=("off", "on", "auto"), default="off", help="llama.cpp flash attention (off: "
                        "exact on the CPU; its CPU kernel works in F16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(os.path.join(args.model_dir, "config.json")) as handle:
        vocab = json.load(handle)["vocab_size"]
    ids = np.random.default_rng(args.seed).integers(0, vocab, args.prompt_len).tolist()
    exe = build_tool(args.llama_cpp, args.build)
    llama_ids, llama_logits = llama_greedy(exe, args.gguf, ids, args.new, args.ngl, args.fa)
    hf_ids, hf_logits = hf_greedy(args.model_dir, ids, args.new, llama_ids)
    diff = np.abs(llama_logits - hf_logits)
    rel = float(np.linalg.norm(llama_logits - hf_logits) / np.linalg.norm(hf_logits))
    same_argmax = float(np.mean(llama_logits.argmax(-1) == hf_logits.argmax(-1)))
    report = {"prompt": ids, "llama_ids": llama_ids, "hf_ids": hf_ids, "ids_equal": llama_ids == hf_ids,
              "max_abs_logit_diff": float(diff.max()), "max_abs_logit": float(np.abs(hf_logits).max()),
              "rel_l2": rel, "argmax_agreement": same_argmax, "positions": int(hf_logits.shape[0])}
    print(json.dumps(report))
    return 0 if report["ids_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
