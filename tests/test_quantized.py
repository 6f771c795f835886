"""Quantized checkpoints (compressed-tensors pack-quantized int4/int8) end to end on the CPU: parsed and checked,
held and moved as their quantized bytes in every tier, and computed by the torch reference path.

The checkpoints are the tiny Qwen3-MoE's (tiny_models.py) with every routed expert quantized by round to nearest
(bf16 scales), written tensor by tensor under the exact compressed-tensors names; the comparison model is
transformers' own Qwen3-MoE loaded with those experts dequantized.
"""

import json
import os

import pytest
import torch
from tiny_models import TIERS, prompt_ids, quantize_experts

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat, QuantMatrix
from moe_offload.kernels.reference import dense, dequantize
from moe_offload.quant.format import QuantSpec
from moe_offload.quant.format import dequantize as format_dequantize
from moe_offload.quant.format import pack
from moe_offload.quant.methods import quantize_weight
from moe_offload.tools.info import describe, format_info

ARCH = "qwen3_moe"  # 2 MoE layers of 8 experts, top-2, I = 16, H = 32
SCHEMES = {"int4-g16-sym": QuantSpec(4, 16, True), "int4-g8-asym": QuantSpec(4, 8, False),
           "int8-g16-asym": QuantSpec(8, 16, False)}
RATIOS = [0, 37, 100]
# float32 compute on both sides and the same dequantized weights: only the summation order of expert outputs
# differs (as in test_correctness.py)
ATOL = 1e-4



@pytest.fixture(scope="module")
def quantized(checkpoint_factory, tmp_path_factory):
    """scheme -> (quantized checkpoint, the same model with its experts dequantized), made once each."""
    made = {}

    def get(scheme: str) -> tuple[str, str]:
        if scheme not in made:
            root = tmp_path_factory.mktemp(scheme)
            made[scheme] = (quantize_experts(checkpoint_factory(ARCH), str(root / "q"), SCHEMES[scheme],
                                             dequantized=str(root / "dq")), str(root / "dq"))
        return made[scheme]

    return get


def test_checkpoint_locates_each_expert_plane_by_plane(quantized):
    path, _ = quantized("int4-g8-asym")
    checkpoint = Checkpoint(path)
    assert checkpoint.quantization == QuantSpec(4, 8, False)
    locations = checkpoint.expert_locations(0, 8, 32, 16)
    fmt = locations[0].format
    assert fmt == ExpertFormat(16, 32, torch.bfloat16, QuantSpec(4, 8, False))
    assert [p.name for p in fmt.planes] == ["gate_up.packed", "gate_up.scale", "gate_up.zero", "down.packed",
                                            "down.scale", "down.zero"]
    assert [p.shape for p in fmt.planes] == [(32, 4), (32, 4), (4, 4), (32, 2), (32, 2), (4, 2)]
    assert all(p.offset % 16 == 0 for p in fmt.planes)
    names = {(e.path, e.start): e.name for e in checkpoint.tensors.values()}
    gate_up_packed = [names[(r.path, r.start)] for r in locations[3].planes[0]]
    assert gate_up_packed == ["model.layers.0.mlp.experts.3.gate_proj.weight_packed",
                              "model.layers.0.mlp.experts.3.up_proj.weight_packed"]
    assert locations[3].nbytes == fmt.nbytes  # packed values, scales and zero points; weight_shape is not read


def test_info_shows_the_scheme_and_the_quantized_bytes(quantized, checkpoint_factory):
    info = describe(Checkpoint(quantized("int4-g16-sym")[0]))
    assert info["quantization"] == {"bits": 4, "group_size": 16, "symmetric": True, "format": "compressed-tensors"}
    # per projection: packed [N, K/8] int32 + scales [N, K/16] bf16
    expected = 2 * (16 * 32 // 8 * 4 + 16 * 2 * 2) + 32 * 16 // 8 * 4 + 32 * 1 * 2
    assert {layer["expert_bytes"] for layer in info["layers"]} == {expected}
    assert "expert weights   int4, group size 16, symmetric (compressed-tensors)" in format_info(info)
    assert describe(Checkpoint(checkpoint_factory(ARCH)))["quantization"] is None


def test_reference_dequantize_is_the_format_modules(quantized):
    """reference.dequantize (the kernels' oracle) equals quant/format.dequantize on every projection of a
    checkpoint expert: the gate and up halves of gate_up with their zero points packed apart."""
    from safetensors import safe_open

    path, _ = quantized("int4-g8-asym")
    spec = QuantSpec(4, 8, False)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as handle:
        module = "model.layers.1.mlp.experts.5.{}"
        want = {proj: format_dequantize({key: handle.get_tensor(module.format(f"{proj}.{key}")) for key in
                                         ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}, spec)
                for proj in ("gate_proj", "up_proj", "down_proj")}
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    try:
        layer = pipe.layers[1]
        slot = layer.table.lookup(5)
        assert torch.equal(dequantize(layer.gate_up[slot]), torch.cat([want["gate_proj"], want["up_proj"]]))
        assert torch.equal(dequantize(layer.down[slot]), want["down_proj"])
    finally:
        pipe.close()


def test_dequantize_takes_groups_that_end_short_of_k():
    """G = ceil(K / g): the last group of a row covers what is left of it (the kernels read such layouts too)."""
    spec = QuantSpec(8, 4, True)
    q = torch.randint(-128, 128, (3, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(0))  # [N, K]
    scale = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # [N, ceil(10/4)]
    matrix = QuantMatrix(pack(q, 8), scale, None, 8, spec.group_size, 10, 1)
    want = q.float() * scale.float().repeat_interleave(4, dim=1)[:, :10]
    assert torch.equal(dequantize(matrix), want)
    assert torch.equal(dense(matrix, torch.float32), want.to(torch.bfloat16).float())  # rounded to the scale's dtype


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matches_transformers_on_the_dequantized_weights(quantized, scheme):
    path, dequantized = quantized(scheme)
    from transformers import AutoModelForCausalLM

    ids = prompt_ids()
    model = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37)
    try:
        with torch.no_grad():
            ref_logits, logits = model(ids).logits, pipe.model(ids).logits
            ref_tokens = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert (logits - ref_logits).abs().max().item() <= ATOL
        tokens = pipe.generate_tokens(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, ref_tokens[0, ids.shape[1]:])
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def resident_logits(quantized):
    """Logits and greedy tokens of each quantized checkpoint fully resident."""
    made = {}

    def get(scheme: str):
        if scheme not in made:
            pipe = LLMPipeline(quantized(scheme)[0], "cpu", MOE_OFFLOAD_RATIO=100)
            with torch.no_grad():
                logits = pipe.model(prompt_ids()).logits
            made[scheme] = (logits, pipe.generate_tokens(prompt_ids(), max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False))
            pipe.close()
        return made[scheme]

    return get


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("scheme", ["int4-g16-sym", "int8-g16-asym"])
def test_every_ratio_and_tier_gives_the_resident_bits(quantized, resident_logits, scheme, ratio, tier):
    """Offloaded quantized experts give the very bits of the fully resident model, and what moves is the
    quantized bytes: each miss streams exactly one expert's packed values, scales and zero points."""
    logits, tokens = resident_logits(scheme)
    pipe = LLMPipeline(quantized(scheme)[0], "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=TIERS[tier])
    try:
        with torch.no_grad():
            assert torch.equal(pipe.model(prompt_ids()).logits, logits)
        assert torch.equal(pipe.generate_tokens(prompt_ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False),
                           tokens)
        stats = pipe.get_offload_stats()
        expert_bytes = pipe.layers[0].format.nbytes
        assert stats["expert_bytes"] == expert_bytes < 3 * 16 * 32 * 2  # fewer than the bf16 expert's bytes
        assert stats["expert_format"].startswith(f"int{SCHEMES[scheme].bits}, group 16")
        streamed = stats["bytes_streamed"][tier]
        assert streamed == sum(stats["experts_streamed"].values()) * expert_bytes
        assert (streamed > 0) == (ratio < 100)
        assert stats["device_expert_bytes"] == stats["resident_experts"] * pipe.layers[0].format.row_bytes
        if tier == "host" and ratio < 100:
            assert stats["host_tier_bytes"] == sum(len(l.host.row_of) for l in pipe.layers) * \
                pipe.layers[0].format.row_bytes
    finally:
        pipe.close()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels on CPU tensors need Triton's interpreter")
def test_the_triton_kernels_run_the_engine_with_read_through_admission(quantized, resident_logits, monkeypatch):
    """Zero-copy with device LRU (Triton's interpreter on the CPU): quantized misses read in place from the host
    tier's rows and admitted into slots as read give the tokens of the resident model; each slot then holds its
    expert's planes bit for bit."""
    pytest.importorskip("triton")
    from triton_interp import gpu_like_bf16

    from moe_offload.kernels.triton_moe import fused_moe

    gpu_like_bf16(monkeypatch)  # the scales are bf16: the interpreter must round to them as a GPU does

    _, tokens = resident_logits("int4-g16-sym")
    pipe = LLMPipeline(quantized("int4-g16-sym")[0], "cpu", MOE_OFFLOAD_RATIO=25)
    try:
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            assert layer.enable_direct(pipe.device, lru=True) and layer.lru_admission
        assert torch.equal(pipe.generate_tokens(prompt_ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False),
                           tokens)
        stats = pipe.get_offload_stats()
        assert stats["experts_read_in_place"] == stats["misses"] > 0
        assert stats["bytes_read_in_place"] == stats["misses"] * pipe.layers[0].format.nbytes
        for layer in pipe.layers:
            for expert, slot in enumerate(layer._direct_slots.tolist()):
                if slot < layer.table.capacity:
                    resident, stored = layer.format.plane_views(layer.slots[slot]), \
                        layer.format.plane_views(layer.host.row(expert))
                    assert all(torch.equal(resident[name], stored[name]) for name in resident)
    finally:
        pipe.close()


def test_the_quantizer_writes_what_the_engine_reads(checkpoint_factory, tmp_path):
    """`moe-offload quantize`'s writer (moe_offload/quant/) and this loader agree on the format."""
    writer = pytest.importorskip("moe_offload.quant.writer")
    out = str(tmp_path / "written")
    writer.quantize_checkpoint(checkpoint_factory(ARCH), out, QuantSpec(4, 16, True), "rtn")
    pipe = LLMPipeline(out, "cpu", MOE_OFFLOAD_RATIO=0)
    try:
        assert pipe.layers[0].format.quant == QuantSpec(4, 16, True)
        assert pipe.generate_tokens(prompt_ids(), max_new_tokens=4, min_new_tokens=4).numel() == 4
    finally:
        pipe.close()


# -- bad input: one line, at load ----------------------------------------------------------------------------

def _edit_config(path: str, edit) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    edit(config["quantization_config"])
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def _copy(src: str, dst) -> str:
    import shutil

    return shutil.copytree(src, str(dst))


def _weights(config: dict) -> dict:
    return config["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(quant_method="gptq"), "None-bit GPTQ weights are not supported"),
    (lambda c: c.update(quant_method="gptq", bits=4, group_size=16, format="gptq"),
     "weight_\\w+ is a compressed-tensors tensor, but config.json's quantization_config is GPTQ"),
    (lambda c: c.update(format="float-quantized") or c["config_groups"]["group_0"].update(format=None),
     "FP8 quantization .*format 'float-quantized'. is not supported"),
    (lambda c: _weights(c).update(actorder="group"), "act-order"),
    (lambda c: _weights(c).update(strategy="tensor", group_size=None), "'tensor'-wise weight quantization"),
    (lambda c: _weights(c).update(strategy="channel", group_size=None),
     "weight_scale is bfloat16 [16, 2], expected floating point [16, 1] for a [16, 32] weight at 4 bits, "
     "channel-wise"),
    (lambda c: _weights(c).update(num_bits=3), "3-bit weights"),
    (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "quantizes activations"),
    (lambda c: _weights(c).update(group_size=8), "weight_scale is bfloat16 [16, 2], expected floating point [16, 4]"),
])
def test_unsupported_schemes_are_refused_by_name(quantized, tmp_path, edit, words):
    path = _copy(quantized("int4-g16-sym")[0], tmp_path / "bad")
    _edit_config(path, edit)
    with pytest.raises(MoeOffloadError, match=words.replace("[", r"\[").replace("]", r"\]")) as caught:
        LLMPipeline(path, "cpu")
    assert "\n" not in str(caught.value)


def test_a_scale_of_the_wrong_shape_is_one_line(quantized, tmp_path):
    """A corrupt quantized tensor: its header says [16, 3] where the scheme needs [16, 2]."""
    from safetensors.torch import load_file, save_file

    path = _copy(quantized("int4-g16-sym")[0], tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.6.up_proj.weight_scale"
    tensors[name] = torch.ones(16, 3, dtype=torch.bfloat16)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(MoeOffloadError, match=rf"^{name} is bfloat16 \[16, 3\], expected floating point \[16, 2\] "
                                              r"for a \[16, 32\] weight at 4 bits, group 16$"):
        LLMPipeline(path, "cpu")


def test_act_order_tensors_are_refused(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(quantized("int4-g16-sym")[0], tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight_g_idx"] = torch.zeros(32, dtype=torch.int32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(MoeOffloadError, match="act-order quantization \\(g_idx\\) is not supported"):
        LLMPipeline(path, "cpu")


def test_quantized_tensors_need_a_quantization_config(quantized, tmp_path):
    path = _copy(quantized("int4-g16-sym")[0], tmp_path / "bad")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    del config["quantization_config"]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with pytest.raises(MoeOffloadError, match=r"experts\.0\.\w+_proj\.weight_\w+ is a quantized tensor, but "
                                              "config.json has no quantization_config"):
        LLMPipeline(path, "cpu")


def test_quantized_weights_outside_the_experts_are_refused(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(quantized("int4-g16-sym")[0], tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    weight = tensors.pop("model.layers.0.self_attn.o_proj.weight")
    tensors.update({f"model.layers.0.self_attn.o_proj.{k}": v
                    for k, v in quantize_weight(weight, QuantSpec(4, 16, True)).items()})
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(MoeOffloadError, match="o_proj.weight_packed: quantized weights outside the routed experts"):
        LLMPipeline(path, "cpu")


# The CPU expert path (MOE_CPU_EXPERTS) on quantized experts: tests/test_hybrid_quant.py.
