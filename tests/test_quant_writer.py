"""`moe-offload quantize` on tiny checkpoints of both expert layouts: what it writes, that everything but the
routed experts is unchanged byte for byte, that transformers loads the result as our reference dequantizes
it, that the same input gives the same bytes, and that a failed run leaves nothing behind."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from moe_offload.checkpoint import INDEX_FILE, Checkpoint
from moe_offload.cli import main
from moe_offload.quant import writer as writer_module
from moe_offload.quant.format import PACKED, SCALE, SHAPE, ZERO, QuantSpec, dequantize
from moe_offload.quant.methods import quantize_weight
from moe_offload.quant.writer import quantize_checkpoint

SPEC = QuantSpec(4, 8, True)  # the tiny models' in_features are 32 (hidden) and 16 (experts)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def _raw_bytes(checkpoint: Checkpoint, name: str) -> bytes:
    entry = checkpoint.tensors[name]
    with open(entry.path, "rb") as handle:
        handle.seek(entry.start)
        return handle.read(entry.nbytes)


def _input_matrices(source: Checkpoint, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Output module name -> input expert matrix [N, K], for either layout."""
    tensors = _tensors(source.root)
    gate, up, down = names
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((".gate_up_proj", ".down_proj")) and tensor.dim() == 3:
            prefix = name.rsplit(".", 1)[0]
            for e, matrix in enumerate(tensor):
                if name.endswith("gate_up_proj"):
                    half = matrix.shape[0] // 2
                    out[f"{prefix}.{e}.{gate}"], out[f"{prefix}.{e}.{up}"] = matrix[:half], matrix[half:]
                else:
                    out[f"{prefix}.{e}.{down}"] = matrix
        elif ".experts." in name and tensor.dim() == 2:
            out[name.removesuffix(".weight")] = tensor
    return out


@pytest.mark.parametrize("arch,layout,names", [
    ("qwen3_moe", "per_expert", ("gate_proj", "up_proj", "down_proj")),
    ("qwen3_moe", "fused", ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "fused", ("w1", "w3", "w2")),  # transformers' Mixtral conversion merges experts.*.w1/w3/w2
    ("qwen2_moe", "per_expert", ("gate_proj", "up_proj", "down_proj")),  # shared expert stays dense
])
def test_writes_quantized_experts_and_leaves_the_rest(checkpoint_factory, tmp_path, arch, layout, names):
    source = Checkpoint(checkpoint_factory(arch, layout))
    out = str(tmp_path / "q")
    spec = QuantSpec(4, 8, False)
    summary = quantize_checkpoint(source.root, out, spec, "mse")
    tensors = _tensors(out)

    matrices = _input_matrices(source, names)
    assert summary["quantized_matrices"] == len(matrices) > 0
    expected_names = set(source.dense_names) | {f"{m}.{k}" for m in matrices for k in (PACKED, SCALE, ZERO, SHAPE)}
    assert set(tensors) == expected_names
    for name in source.dense_names:  # attention, routers, shared experts, norms, embeddings: the same bytes
        assert tensors[name].dtype == source.tensors[name].dtype, name
        assert tensors[name].contiguous().view(torch.uint8).numpy().tobytes() == _raw_bytes(source, name), name
    for module, matrix in matrices.items():
        parts = {k: tensors[f"{module}.{k}"] for k in (PACKED, SCALE, ZERO, SHAPE)}
        reference = quantize_weight(matrix, spec, "mse")
        assert all(torch.equal(parts[k], reference[k]) for k in parts), module
        restored = dequantize(parts, spec, module)
        assert (restored - matrix).abs().max() <= parts[SCALE].max() * 1.01  # within a step (clipped range)

    with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    quant = config.pop("quantization_config")
    with open(os.path.join(source.root, "config.json"), encoding="utf-8") as handle:
        assert config == json.load(handle)
    assert quant["format"] == "pack-quantized" and quant["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "lm_head" in quant["ignore"] and not any(".experts." in m for m in quant["ignore"])
    assert any(m.endswith("self_attn.q_proj") for m in quant["ignore"])
    assert any(m.endswith((".mlp.gate", ".block_sparse_moe.gate")) for m in quant["ignore"])
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and not os.path.exists(os.path.join(out, INDEX_FILE))


def test_both_layouts_give_the_same_tensors(checkpoint_factory, tmp_path):
    """The same model saved per expert and fused (3-D) quantizes to the same named tensors."""
    a = _tensors(quantize_checkpoint(checkpoint_factory("qwen3_moe", "per_expert"), str(tmp_path / "a"),
                                     SPEC)["output"])
    b = _tensors(quantize_checkpoint(checkpoint_factory("qwen3_moe", "fused"), str(tmp_path / "b"),
                                     SPEC)["output"])
    assert set(a) == set(b)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_transformers_loads_it_as_our_reference(checkpoint_factory, tmp_path):
    """transformers' compressed-tensors loader dequantizes the experts to exactly our reference's values."""
    from transformers import AutoModelForCausalLM

    source = checkpoint_factory("qwen3_moe", "per_expert")
    out = quantize_checkpoint(source, str(tmp_path / "q"), SPEC, "mse")["output"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tensors = _tensors(out)

    def weight(module):
        return dequantize({k: tensors[f"{module}.{k}"] for k in (PACKED, SCALE, SHAPE)}, SPEC, module)

    with torch.no_grad():
        for index, layer in enumerate(reference.model.layers):
            experts, prefix = layer.mlp.experts, f"model.layers.{index}.mlp.experts"
            for e in range(experts.gate_up_proj.shape[0]):
                gate, up = weight(f"{prefix}.{e}.gate_proj"), weight(f"{prefix}.{e}.up_proj")
                experts.gate_up_proj[e] = torch.cat([gate, up])
                experts.down_proj[e] = weight(f"{prefix}.{e}.down_proj")
        ids = torch.tensor([[1, 5, 9, 20, 33, 2, 7]])
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_shards_with_an_index_are_aligned_and_readable(checkpoint_factory, tmp_path):
    source = checkpoint_factory("qwen3_moe", "fused")
    out = quantize_checkpoint(source, str(tmp_path / "q"), SPEC, max_shard_bytes=20_000)["output"]
    with open(os.path.join(out, INDEX_FILE), encoding="utf-8") as handle:
        weight_map = json.load(handle)["weight_map"]
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(_tensors(out))
    for shard in shards:
        with open(os.path.join(out, shard), "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        assert (8 + length) % 8 == 0
        for name, info in header.items():
            if name != "__metadata__":
                itemsize = {"I32": 4, "I64": 8, "F32": 4, "BF16": 2, "F16": 2}[info["dtype"]]
                assert info["data_offsets"][0] % itemsize == 0, name
    Checkpoint(out)  # the engine's own header validation: offsets tile the data, no overlap, sizes match


def _all_bytes(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_same_input_same_bytes(checkpoint_factory, tmp_path):
    """Deterministic, whatever torch's thread count."""
    source = checkpoint_factory("qwen2_moe", "per_expert")
    spec = QuantSpec(4, 8, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = quantize_checkpoint(source, str(tmp_path / "a"), spec, "mse", max_shard_bytes=50_000)["output"]
        torch.set_num_threads(2)
        second = quantize_checkpoint(source, str(tmp_path / "b"), spec, "mse", max_shard_bytes=50_000)["output"]
    finally:
        torch.set_num_threads(threads)
    assert _all_bytes(first) == _all_bytes(second)


def test_a_failed_run_leaves_nothing(checkpoint_factory, tmp_path, monkeypatch):
    calls = []

    def failing(weight, spec, method):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a user's Ctrl-C mid-way would
        return quantize_weight(weight, spec, method)

    monkeypatch.setattr(writer_module, "quantize_weight", failing)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(checkpoint_factory("qwen3_moe", "per_expert"), str(out), SPEC)
    assert len(calls) == 5 and os.listdir(tmp_path) == []


def test_cli_writes_into_an_empty_folder(checkpoint_factory, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    assert main(["quantize", checkpoint_factory("olmoe", "per_expert"), "-o", str(out), "--bits", "8",
                 "--group-size", "16", "--method", "rtn"]) == 0
    said = capsys.readouterr().out
    assert "8 bits" in said and "group 16" in said and "symmetric" in said
    with open(out / "config.json", encoding="utf-8") as handle:
        weights = json.load(handle)["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (8, 16, True)
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_cli_default_group_size_fits_the_experts(checkpoint_factory, tmp_path, capsys):
    """Without --group-size: 128 where it divides the experts' in_features, else the largest power of two under
    it that does (here 16: hidden 32, expert intermediate 16), said on stderr and written in the config."""
    out = tmp_path / "q"
    assert main(["quantize", checkpoint_factory("qwen3_moe"), "-o", str(out), "--bits", "4", "--method", "rtn"]) == 0
    said = capsys.readouterr()
    assert "group 16" in said.out and "group size 16: the largest up to 128" in said.err
    with open(out / "config.json", encoding="utf-8") as handle:
        weights = json.load(handle)["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 16


@pytest.mark.parametrize("width, group", [(2048, 128), (768, 128), (192, 64), (48, 16), (45, 45), (7, 7)])
def test_group_dividing(width, group):
    assert writer_module.group_dividing(width, 128) == group
