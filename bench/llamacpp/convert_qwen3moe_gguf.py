"""Qwen3-MoE safetensors checkpoint -> GGUF (arch `qwen3moe`) for llama.cpp, one layer at a time.

Why our own: llama.cpp's convert_hf_to_gguf.py needs the model's tokenizer files (the random benchmark model has
none) and the whole conversion package with its dependencies; the GPU machine has no network. This writes the same
tensor names, layout and types as that script does for Qwen3MoeForCausalLM (stacked experts `ffn_{gate,up,down}_exps`
[E, I, H] / [E, H, I], router `ffn_gate_inp` and norms in F32, the rest BF16, no q/k permutation: qwen3moe is a
NEOX-rope arch) with the vendored gguf-py writer, and copies the tokenizer from llama.cpp's models/ggml-vocab-qwen2.gguf
(151,936 tokens, the Qwen2/3 vocab). Where the checkpoint's vocab_size differs from that, the token list is cut (merges
that name a dropped token are dropped too) or padded with [PADn] UNUSED tokens, as llama.cpp pads Qwen vocabs; the
bos/eos ids come from config.json and are left out when they fall outside the vocab.

Reads safetensors itself (header + numpy memmap; bf16 stays raw uint16), so neither torch nor a whole shard is loaded:
peak RAM is about one stacked expert tensor (400 MB for Qwen3-30B-A3B's shape). `--outtype f32` writes every tensor in
F32 (exact bf16 -> f32), which makes llama.cpp's CPU backend compute in F32: used to check the layout against
transformers to float32 accuracy.

Usage: python -m bench.llamacpp.convert_qwen3moe_gguf MODEL_DIR OUT.gguf [--llama-cpp DIR/llama.cpp]
       [--outtype bf16|f32] [--vocab VOCAB.gguf] [--gguf-py DIR]   (--llama-cpp: build.sh's extracted tree, default
       /tmp/llamacpp/llama.cpp; gguf-py and models/ggml-vocab-qwen2.gguf are taken from it)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time

import numpy as np

ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


class SafeTensors:
    """Every tensor of a folder's *.safetensors files, as numpy views of a memmap (bf16 as raw uint16)."""

    def __init__(self, folder: str):
        self.where: dict[str, tuple[str, str, list[int], int, int]] = {}
        for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
            path = os.path.join(folder, file)
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.where[name] = (path, info["dtype"], info["shape"], 8 + size + begin, end - begin)
        self.maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][2])

    def get(self, name: str) -> tuple[np.ndarray, str]:
        path, dtype, shape, offset, nbytes = self.where[name]
        if dtype not in ST_DTYPES:
            raise ValueError(f"{name}: unsupported dtype {dtype}")
        if path not in self.maps:
            self.maps = {path: np.memmap(path, dtype=np.uint8, mode="r")}  # one shard mapped at a time
        raw = self.maps[path][offset:offset + nbytes]
        return raw.view(ST_DTYPES[dtype]).reshape(shape), dtype


def to_bf16(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return np.ascontiguousarray(array)
    bits = array.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def to_f32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def plan(config: dict, st: SafeTensors):
    """[(gguf name, torch-order shape, 'f32'|'w', source)]: source is a tensor name, or ('stack', names) for experts
    stored one per key, or ('half', name, 0|1) for a fused gate_up_proj [E, 2I, H]."""
    n_layer, n_expert = config["num_hidden_layers"], config.get("num_experts", config.get("num_local_experts"))
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("dense (mlp_only) layers are not supported by llama.cpp's qwen3moe")
    if config.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported here")
    out = [("token_embd.weight", "model.embed_tokens.weight", "w")]
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [(b + "attn_norm.weight", p + "input_layernorm.weight", "f32"),
                (b + "attn_q.weight", p + "self_attn.q_proj.weight", "w"),
                (b + "attn_k.weight", p + "self_attn.k_proj.weight", "w"),
                (b + "attn_v.weight", p + "self_attn.v_proj.weight", "w"),
                (b + "attn_output.weight", p + "self_attn.o_proj.weight", "w"),
                (b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", "f32"),
                (b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", "f32"),
                (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", "f32"),
                (b + "ffn_gate_inp.weight", p + "mlp.gate.weight", "f32")]
        fused = p + "mlp.experts.gate_up_proj"
        for proj, gguf_name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                ("down_proj", "ffn_down_exps")):
            if fused in st or fused + ".weight" in st:
                key = fused if fused in st else fused + ".weight"
                down = p + "mlp.experts.down_proj"
                src = (("half", key, 0 if proj == "gate_proj" else 1) if proj != "down_proj"
                       else down if down in st else down + ".weight")
            else:
                src = ("stack", [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(n_expert)])
            out.append((b + gguf_name + ".weight", src, "w"))
    out.append(("output_norm.weight", "model.norm.weight", "f32"))
    if "lm_head.weight" in st:
        out.append(("output.weight", "lm_head.weight", "w"))  # absent when tied: llama.cpp reuses token_embd
    return out


def source_shape(st: SafeTensors, src) -> tuple[int, ...]:
    if isinstance(src, str):
        return st.shape(src)
    if src[0] == "stack":
        return (len(src[1]),) + st.shape(src[1][0])
    e, two_i, h = st.shape(src[1])
    return (e, two_i // 2, h)


def load(st: SafeTensors, src, kind: str, outtype: str) -> np.ndarray:
    convert = to_f32 if kind == "f32" or outtype == "f32" else to_bf16
    if isinstance(src, str):
        return convert(*st.get(src))
    if src[0] == "half":
        array, dtype = st.get(src[1])
        half = array.shape[1] // 2
        return convert(array[:, half * src[2]:half * (src[2] + 1)], dtype)
    first, dtype = st.get(src[1][0])
    out = np.empty((len(src[1]),) + first.shape, dtype=convert(first[:1], dtype).dtype)
    for e, name in enumerate(src[1]):
        out[e] = convert(*st.get(name))
    return out


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_kv(path: str) -> dict:
    """{key: value} of a GGUF file's metadata (gguf-py's GGUFReader takes ~10 s on the 151,936-token vocab)."""
    import struct

    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    n_kv, pos = struct.unpack_from("<Q", data, 16)[0], 24

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            length = struct.unpack_from("<Q", data, pos)[0]
            pos += 8 + length
            return data[pos - length:pos].decode("utf-8")
        if vtype == 9:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [value(sub) for _ in range(count)]
        fmt = SCALARS[vtype]
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, pos - struct.calcsize(fmt))[0]

    out = {}
    for _ in range(n_kv):
        key = value(8)
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        out[key] = value(vtype)
    return out


def copy_tokenizer(gguf, writer, vocab_path: str, n_vocab: int, config: dict) -> str:
    fields = {k: v for k, v in read_gguf_kv(vocab_path).items() if k.startswith("tokenizer.")}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = fields["tokenizer.ggml.merges"]
    note = f"{len(tokens)} tokens"
    if n_vocab < len(tokens):
        tokens, types = tokens[:n_vocab], types[:n_vocab]
        kept = set(tokens)
        merges = [m for m in merges if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" ", 1))]
        note += f" cut to {n_vocab} ({len(merges)} merges left)"
    elif n_vocab > len(tokens):
        pad = range(len(tokens), n_vocab)
        tokens, types = tokens + [f"[PAD{i}]" for i in pad], types + [gguf.TokenType.UNUSED] * len(pad)
        note += f" padded to {n_vocab}"
    array, string, i32, u32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32, \
        gguf.GGUFValueType.UINT32
    writer.add_key_value("tokenizer.ggml.tokens", tokens, array, sub_type=string)
    writer.add_key_value("tokenizer.ggml.token_type", [int(t) for t in types], array, sub_type=i32)
    writer.add_key_value("tokenizer.ggml.merges", merges, array, sub_type=string)
    ids = {k: v for k, v in fields.items() if k.endswith("_token_id")}
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if isinstance(config.get(name), int):
            ids[key] = config[name]
    for key, value in ids.items():
        if value < n_vocab:
            writer.add_key_value(key, int(value), u32)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if key in fields:
            writer.add_key_value(key, fields[key], string)
    return note


def load_gguf(gguf_py: str):
    """The `gguf` package of llama.cpp's gguf-py folder (the writer of the same llama.cpp that reads the file),
    loaded from there by path, ahead of any other `gguf` installed."""
    folder = os.path.join(gguf_py, "gguf")
    spec = importlib.util.spec_from_file_location("gguf", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf"] = module  # its submodules import `gguf.` names
    spec.loader.exec_module(module)
    return module


def convert(model_dir: str, out_path: str, vocab_path: str, gguf_py: str, outtype: str = "bf16") -> dict:
    started = time.perf_counter()
    gguf = load_gguf(gguf_py)

    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    if not config.get("norm_topk_prob", False):
        print("warning: norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the top-k weights")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError(f"rope scaling is not handled here: {rope or config.get('rope_scaling')}")
    st = SafeTensors(model_dir)
    tensors = plan(config, st)
    n_vocab = st.shape("model.embed_tokens.weight")[0]

    writer = gguf.GGUFWriter(out_path, "qwen3moe")
    writer.add_name(os.path.basename(os.path.normpath(model_dir)))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 40960))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 1e6))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_expert_count(config.get("num_experts", config.get("num_local_experts")))
    writer.add_expert_used_count(config["num_experts_per_tok"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_note = copy_tokenizer(gguf, writer, vocab_path, n_vocab, config)

    total = 0
    for name, src, kind in tensors:
        shape = source_shape(st, src)
        f32 = kind == "f32" or outtype == "f32"
        nbytes = int(np.prod(shape)) * (4 if f32 else 2)
        writer.add_tensor_info(name, shape, np.float32 if f32 else np.uint16, nbytes,
                               raw_dtype=gguf.GGMLQuantizationType.F32 if f32 else gguf.GGMLQuantizationType.BF16)
        total += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    layer = None
    for name, src, kind in tensors:
        match = re.match(r"blk\.(\d+)\.", name)
        if match and match.group(1) != layer:
            layer = match.group(1)
            print(f"[{time.perf_counter() - started:6.1f}s] layer {layer}", flush=True)
        writer.write_tensor_data(load(st, src, kind, outtype))
    writer.close()
    seconds = time.perf_counter() - started
    result = {"gguf": out_path, "tensors": len(tensors), "bytes": os.path.getsize(out_path), "tensor_bytes": total,
              "outtype": outtype, "vocab": vocab_note, "seconds": round(seconds, 2)}
    print(f"converted {model_dir} -> {out_path}: {len(tensors)} tensors, {result['bytes'] / 1e9:.2f} GB, "
          f"tokenizer {vocab_note}, {seconds:.1f} s", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--llama-cpp", default="/tmp/llamacpp/llama.cpp",
                        help="llama.cpp source tree (build.sh's DIR/llama.cpp): gguf-py and the vocab come from it")
    parser.add_argument("--vocab", default=None, help="default LLAMA_CPP/models/ggml-vocab-qwen2.gguf")
    parser.add_argument("--gguf-py", default=None, help="default LLAMA_CPP/gguf-py")
    parser.add_argument("--outtype", choices=("bf16", "f32"), default="bf16")
    args = parser.parse_args(argv)
    convert(args.model_dir, args.out, args.vocab or os.path.join(args.llama_cpp, "models", "ggml-vocab-qwen2.gguf"),
            args.gguf_py or os.path.join(args.llama_cpp, "gguf-py"), args.outtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
