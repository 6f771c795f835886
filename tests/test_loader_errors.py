"""A loader that never lies (issue 18): checkpoints that used to load and answer wrongly, crash with a traceback,
hang, or be called "a dense model" now end as ONE line `moe-offload: error: ...` (exit 2) naming the problem,
in `info` (headers only) and in `generate` (the model is built); the Python API raises MoeOffloadError.

Every case starts from the tiny qwen3_moe checkpoint of conftest.py (2 MoE layers of 8 experts, top-2,
float32, one model.safetensors) and damages a copy: a header rewritten, tensors added or removed, config.json
edited, files moved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_offload import LLMPipeline, MoeOffloadError
from moe_offload.cli import main

PREFIX = "moe-offload: error:"
ARCH = "qwen3_moe"
WEIGHTS = "model.safetensors"
GATE = "model.layers.0.mlp.experts.0.gate_proj.weight"


# -- damaging a copy of the tiny checkpoint ----------------------------------------------------------------------

def _edit_header(root: str, edit) -> None:
    """Rewrite root/model.safetensors' header through edit(header), keeping the data bytes (and the header's
    length, padded with spaces as the format allows)."""
    path = os.path.join(root, WEIGHTS)
    with open(path, "rb") as handle:
        raw = handle.read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * max(0, length - len(text))
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _edit_tensors(root: str, edit) -> None:
    """Rewrite root/model.safetensors with edit(tensors) applied to its name -> tensor dict."""
    path = os.path.join(root, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(root: str, **changes) -> None:
    path = os.path.join(root, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(changes)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def _write_config_text(text: str):
    def damage(root):
        with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as handle:
            handle.write(text)
    return damage


def _relabel(name: str, dtype):
    def damage(root):
        _edit_header(root, lambda header: header[name].update(dtype=dtype))
    return damage


def _rename_expert(old: int, new: int):
    """Expert `old` of layer 0 renamed `new`: still 8 experts, but numbered past the config's 0..7."""
    def damage(root):
        def edit(header):
            for key in [k for k in header if k.startswith(f"model.layers.0.mlp.experts.{old}.")]:
                header[key.replace(f"experts.{old}.", f"experts.{new}.")] = header.pop(key)
        _edit_header(root, edit)
    return damage


def _add_tensor(name: str, shape: tuple[int, ...]):
    return lambda root: _edit_tensors(root, lambda tensors: tensors.__setitem__(name, torch.randn(shape)))


def _drop_tensor(name: str):
    return lambda root: _edit_tensors(root, lambda tensors: tensors.pop(name))


def _experts_shard_not_in_index(root):
    """Two shards, dense and experts, and an index naming only the dense one (the experts' file is still there)."""
    tensors = load_file(os.path.join(root, WEIGHTS))
    os.remove(os.path.join(root, WEIGHTS))
    experts = {k: v for k, v in tensors.items() if ".experts." in k}
    dense = {k: v for k, v in tensors.items() if k not in experts}
    save_file(dense, os.path.join(root, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(experts, os.path.join(root, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(root, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in dense}}, handle)


def _quant_config(**config):
    return lambda root: _edit_config(root, quantization_config=config)


def _gptq_tensors(root):
    """GPTQ's names without its config (a stripped export): every expert weight is a `qweight` int32."""
    def edit(header):
        for key in [k for k in header if ".experts." in k and k.endswith(".weight")]:
            header[key.removesuffix(".weight") + ".qweight"] = dict(header.pop(key), dtype="I32")
    _edit_header(root, edit)


def _awq_tensors(root):
    """AWQ's names without its config: `qweight` and `qzeros` but no `g_idx` (what tells it from GPTQ)."""
    def edit(header):
        for key in [k for k in header if ".experts." in k and k.endswith(".weight")]:
            header[key.removesuffix(".weight") + ".qweight"] = dict(header.pop(key), dtype="I32")
        header["model.layers.0.mlp.experts.0.gate_proj.qzeros"] = dict(header.pop("model.norm.weight"), dtype="I32")
    _edit_header(root, edit)


def _fp8_per_tensor(root):
    """FP8 with one scale per tensor (quant_method fp8 without weight_block_size): only block scales are read
    (tests/test_fp8.py loads those)."""
    def edit(tensors):
        for key in [k for k in tensors if ".experts." in k]:
            tensors[key] = tensors[key].to(torch.float8_e4m3fn)
            tensors[key + "_scale_inv"] = torch.ones(())
    _edit_tensors(root, edit)
    _edit_config(root, quantization_config={"quant_method": "fp8", "weight_block_size": None})


def _gguf_only(root):
    for name in os.listdir(root):
        os.remove(os.path.join(root, name))
    with open(os.path.join(root, "model-Q4_K_M.gguf"), "wb") as handle:
        handle.write(b"GGUF" + b"\0" * 60)


# name -> (damage(root), words the one error line must hold, "headers": `info` refuses it too / "load": only a
# built model can tell)
CASES = {
    # routed experts that do not match the config: a truncated or mismatched model would run
    "config_with_fewer_layers": (lambda root: _edit_config(root, num_hidden_layers=1),
                                 ["routed experts in layer 1", "do not match"], "headers"),
    "config_with_fewer_experts": (lambda root: _edit_config(root, num_local_experts=4),
                                  ["layer 0", "8 routed experts", "config says 4 (0-3)"], "headers"),
    "expert_numbers_past_the_config": (_rename_expert(7, 9), ["layer 0", "numbered 0-6, 9", "says 8 (0-7)"],
                                       "headers"),
    "expert_bias_the_model_has_no_place_for": (_add_tensor("model.layers.0.mlp.experts.0.gate_proj.bias", (16,)),
                                               ["experts.0.gate_proj.bias", "routed experts", "no place"], "load"),
    "missing_dense_tensor": (_drop_tensor("model.norm.weight"), ["lacks 1 tensors", "model.norm.weight"], "load"),
    # dtypes a weight cannot have
    "expert_weight_relabelled_i32": (_relabel(GATE, "I32"), [GATE, "dtype I32", "BF16, F16 or F32"], "headers"),
    "dense_weight_relabelled_i32": (_relabel("model.norm.weight", "I32"), ["model.norm.weight", "dtype I32"],
                                    "headers"),
    "header_dtype_not_a_string": (_relabel("model.norm.weight", ["F32"]),
                                  ["corrupt safetensors header", "model.norm.weight", "not a string"], "headers"),
    # num_experts_per_tok the router cannot serve
    "top_k_zero": (lambda root: _edit_config(root, num_experts_per_tok=0),
                   ["num_experts_per_tok is 0", "from 1 to the 8"], "headers"),
    "top_k_above_experts": (lambda root: _edit_config(root, num_experts_per_tok=9),
                            ["num_experts_per_tok is 9", "from 1 to the 8"], "headers"),
    # config.json that is not a JSON object
    "config_invalid_json": (_write_config_text('{"model_type": "qwen3_moe",'), ["config.json", "not valid JSON"],
                            "headers"),
    "config_empty": (_write_config_text(""), ["config.json", "is empty"], "headers"),
    "config_a_list": (_write_config_text('[{"model_type": "qwen3_moe"}]'), ["config.json", "JSON list",
                                                                           "not an object"], "headers"),
    # the experts' shard left out of the index: not "a dense model"
    "index_leaves_out_the_experts": (_experts_shard_not_in_index,
                                     ["names 8 routed experts", "no routed expert tensors",
                                      "model.safetensors.index.json", "model-00002-of-00002.safetensors"], "headers"),
    # quantized formats we do not read: named, never "dense model", never a traceback
    "bitsandbytes": (_quant_config(quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                     ["bitsandbytes quantization", "not supported"], "headers"),
    "bitsandbytes_without_quant_method": (_quant_config(load_in_8bit=True), ["bitsandbytes quantization"], "headers"),
    "awq_gemv": (_quant_config(quant_method="awq", bits=4, group_size=128, version="gemv"),
                 ["AWQ version 'gemv' is not supported"], "headers"),
    # GPTQ and AWQ are read (tests/test_gptq.py), but not their config over unquantized experts nor their
    # tensors without one
    "awq_config": (_quant_config(quant_method="awq", bits=4, group_size=128, version="gemm"),
                   ["quantization_config is AWQ", "routed experts are not quantized"], "headers"),
    "awq_tensors": (_awq_tensors, ["AWQ quantization", "qweight", "cannot be read", "no quantization_config"],
                    "headers"),
    "gptq_config": (_quant_config(quant_method="gptq", bits=4, group_size=128, desc_act=False),
                    ["quantization_config is GPTQ", "routed experts are not quantized"], "headers"),
    "gptq_qweight_tensors": (_gptq_tensors, ["GPTQ quantization", "qweight", "cannot be read",
                                             "no quantization_config"], "headers"),
    "bitsandbytes_tensors": (_add_tensor("model.layers.0.mlp.experts.0.gate_proj.weight.absmax", (4,)),
                             ["bitsandbytes quantization", "weight.absmax", "not supported"], "headers"),
    "nvfp4_compressed_tensors": (
        _quant_config(quant_method="compressed-tensors", format="nvfp4-pack-quantized",
                      config_groups={"group_0": {"format": "nvfp4-pack-quantized", "targets": ["Linear"],
                                                 "weights": {"num_bits": 4, "type": "float", "group_size": 16}}}),
        ["NVFP4 quantization", "not supported"], "headers"),
    "nvfp4_tensors": (_add_tensor("model.layers.0.mlp.experts.0.gate_proj.weight_global_scale", (1,)),
                      ["NVFP4 quantization", "weight_global_scale", "not supported"], "headers"),
    "nvfp4_modelopt": (_quant_config(quant_method="modelopt", quant_algo="NVFP4"), ["NVFP4 quantization"],
                       "headers"),
    "mxfp4": (_quant_config(quant_method="mxfp4"), ["MXFP4 quantization", "not supported"], "headers"),
    "fp8_per_tensor": (_fp8_per_tensor, ["per-tensor FP8 quantization", "not supported"], "headers"),
    "unknown_quant_method": (_quant_config(quant_method="hqq_v9"), ["quant_method 'hqq_v9'", "not supported"],
                             "headers"),
    "gguf_file_alone": (_gguf_only, ["GGUF quantization", "model-Q4_K_M.gguf", "not supported"], "headers"),
}


@pytest.fixture(scope="module")
def broken(checkpoint_factory, tmp_path_factory):
    """broken(name) -> a damaged copy of the tiny checkpoint, made once per module."""
    made: dict[str, str] = {}
    base = tmp_path_factory.mktemp("broken")

    def make(name: str) -> str:
        if name not in made:
            root = str(base / f"c{len(made)}")  # no case name in the path: it could satisfy a word check
            shutil.copytree(checkpoint_factory(ARCH), root)
            CASES[name][0](root)
            made[name] = root
        return made[name]

    return make


def _one_line(capsys, argv: list[str], words: list[str], path: str) -> str:
    """Run the CLI in-process (another exception type fails the test with its traceback): exit 2, stderr one
    `moe-offload: error:` line holding every word (the checkpoint's path left out), nothing on stdout."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit status {rc}, stderr {err!r}"
    assert out == "" and err.startswith(PREFIX) and err.count("\n") == 1, err
    text = err.replace(path, "<path>").lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {err!r}"
    assert "dense model" not in text
    return err


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[2] == "headers"])
def test_info_refuses(name, broken, capsys):
    path = broken(name)
    _one_line(capsys, ["info", path], CASES[name][1], path)


@pytest.mark.parametrize("name", list(CASES))
def test_generate_refuses(name, broken, capsys):
    path = broken(name)
    _one_line(capsys, ["generate", "hello", "--device", "cpu", "-n", "2", "--model", path], CASES[name][1], path)


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_gguf_file_given_as_the_model_is_named(command, tmp_path, capsys):
    """A .gguf file itself (not a folder) as the model: its format, in one line, before anything is opened."""
    path = tmp_path / "model-Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    argv = ["info", str(path)] if command == "info" else ["generate", "hi", "--device", "cpu", "--model", str(path)]
    _one_line(capsys, argv, ["GGUF quantization", "model-Q4_K_M.gguf", "not supported"], str(tmp_path))


@pytest.mark.parametrize("name", ["config_with_fewer_layers", "expert_bias_the_model_has_no_place_for",
                                  "expert_weight_relabelled_i32", "top_k_zero", "config_a_list",
                                  "gptq_qweight_tensors"])
def test_api_raises_moe_offload_error(name, broken):
    with pytest.raises(MoeOffloadError) as caught:
        LLMPipeline(broken(name), "cpu")
    assert "\n" not in str(caught.value)


# -- what still loads ----------------------------------------------------------------------------------------------

def test_unused_dense_tensor_is_a_warning_naming_it(checkpoint_factory, tmp_path, caplog):
    """Tensors outside the routed experts that the model has no place for: loaded anyway, as transformers does,
    with a warning giving their count and names."""
    root = str(tmp_path / "c")
    shutil.copytree(checkpoint_factory(ARCH), root)
    _add_tensor("model.layers.0.self_attn.extra_proj.weight", (4, 4))(root)
    with caplog.at_level(logging.WARNING, logger="moe_offload"):
        pipe = LLMPipeline(root, "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 tensors" in w and "model.layers.0.self_attn.extra_proj.weight" in w for w in warnings), warnings
    assert pipe.generate("def", max_new_tokens=2) is not None


def test_quantized_tensors_keep_their_integer_dtypes_but_not_others(checkpoint_factory, tmp_path, capsys):
    """compressed-tensors' weight_packed is I32 and weight_shape I64 legitimately; a packed weight relabelled
    F32 is refused."""
    from tiny_models import quantize_experts

    from moe_offload.quant.format import QuantSpec

    path = quantize_experts(checkpoint_factory(ARCH), str(tmp_path / "q"), QuantSpec(4, 8, True))
    capsys.readouterr()
    assert main(["info", path]) == 0
    _relabel("model.layers.1.mlp.experts.3.down_proj.weight_packed", "F32")(path)
    _one_line(capsys, ["info", path], ["experts.3.down_proj.weight_packed", "dtype F32", "expected I32"], path)


def test_api_without_tokenizer_says_so(checkpoint_factory, tmp_path):
    """No tokenizer files: transformers still builds an empty tokenizer from config.json, which made every
    prompt "empty"; the pipeline now says the tokenizer is missing."""
    from tiny_models import make_checkpoint

    root = make_checkpoint(ARCH, str(tmp_path / "c"), with_tokenizer=False)
    pipe = LLMPipeline(root, "cpu")
    with pytest.raises(MoeOffloadError, match="no tokenizer in") as caught:
        pipe.generate("hello", max_new_tokens=2)
    assert "\n" not in str(caught.value)


def test_fifo_named_model_safetensors_does_not_hang_info(checkpoint_factory, tmp_path):
    """Opening a FIFO blocks until a writer comes: refused before it is opened. Run as a real process with a
    timeout, so a regression fails instead of hanging the suite."""
    root = str(tmp_path / "c")
    os.makedirs(root)
    shutil.copy(os.path.join(checkpoint_factory(ARCH), "config.json"), root)
    os.mkfifo(os.path.join(root, WEIGHTS))
    result = subprocess.run([sys.executable, "-m", "moe_offload.cli", "info", root], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(PREFIX) and result.stderr.count("\n") == 1, result.stderr
    assert "model.safetensors" in result.stderr and "FIFO" in result.stderr
