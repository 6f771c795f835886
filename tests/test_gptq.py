"""GPTQ checkpoints (quant_method gptq, quant/gptq.py): located in GPTQ's layout, repacked into compressed-tensors'
planes as each expert is read, held and streamed at the format's size, computed by the reference path.

The fixtures are the tiny Qwen3-MoE's (H = 32, I = 16) with every routed expert written as GPTQ writes it, by
this file's own packing (not the engine's): `qweight` int32 [K*b/32, N] packed along K, `qzeros` int32
[G, N*b/32] packed along N, `scales` float16 [G, N], `g_idx` int32 [K]; v1 stores each zero point minus one.
The comparison model is transformers' Qwen3-MoE holding what GPTQ's torch kernel computes from those tensors,
scales[g_idx[k], n] * (q[k, n] - z[g, n]) in float16, stored as float32.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, save_quantized_pair

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat
from moe_offload.kernels.reference import dequantize
from moe_offload.quant import gptq
from moe_offload.quant.format import QuantSpec
from moe_offload.tools.info import describe, format_info

ARCH = "qwen3_moe"
# float32 compute on both sides and the same weights: only the summation order of expert outputs differs
ATOL = 1e-4
SCHEMES = {  # name -> (bits, group_size (-1: per channel), checkpoint_format, sym)
    "int4-g16-v1-sym": (4, 16, "gptq", True),
    "int8-channel-v2-asym": (8, -1, "gptq_v2", False),
    "awq-int4-g16": (4, 16, "awq", False),
}
ATTENTION = {"int4-g16-v1-sym", "awq-int4-g16"}  # attention projections quantized too (dequantized at load)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit values [R, C] -> int32 [R / (32/b), C], packed along dim 0, the first value lowest (GPTQ)."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.int64)
    for j in range(per_word):
        words |= values[j::per_word].to(torch.int64) << (bits * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(weight: torch.Tensor, bits: int, group_size: int, version: int, sym: bool,
                 g_idx: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """GPTQ's tensors of one Linear W [N, K] (round to nearest per group), and W as GPTQ dequantizes them
    (float16, as float32)."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group if g_idx is None else g_idx
    top = (1 << bits) - 1
    w = weight.t().float()  # [K, N]
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        block = w[g_idx == g]  # [k, N]
        low, high = block.amin(0).clamp(max=0), block.amax(0).clamp(min=0)
        if sym:
            scales[g] = (torch.maximum(-low, high) * 2 / top).clamp(min=1e-4).half()
            zeros[g] = (top + 1) // 2
        else:
            scales[g] = ((high - low) / top).clamp(min=1e-4).half()
            zeros[g] = torch.round(-low / scales[g].float()).clamp(1, top - 1)  # v1 cannot store 0
    s, z = scales.float()[g_idx.long()], zeros[g_idx.long()]  # [K, N]
    q = torch.clamp(torch.round(w / s) + z, 0, top).to(torch.int64)  # [K, N] unsigned
    stored = zeros - (1 if version == 1 else 0)  # v1 keeps z - 1
    tensors = {"qweight": _pack(q, bits), "qzeros": _pack(stored.t(), bits).t().contiguous(), "scales": scales,
               "g_idx": g_idx}
    return tensors, ((q - z).float() * s).half().float().t().contiguous()  # [N, K]


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's packer: nibble i of a word holds column 8c + AWQ_ORDER[i]


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, C] -> int32 [R, C / 8], packed along dim 1 in AWQ's interleaved order."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        words |= values[:, column::8].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_tensors(weight: torch.Tensor, group_size: int) -> tuple[dict, torch.Tensor]:
    """AWQ GEMM's tensors of W [N, K] (the same integers as gptq_tensors' v2, packed along N) and W as AWQ's
    kernel dequantizes them."""
    tensors, dequantized = gptq_tensors(weight, 4, group_size, 2, sym=False)
    q = torch.stack([(tensors["qweight"].to(torch.int64) >> (4 * j)) & 15 for j in range(8)], 1)  # [K/8, 8, N]
    z = torch.stack([(tensors["qzeros"].to(torch.int64) >> (4 * j)) & 15 for j in range(8)], 2)  # [G, N/8, 8]
    return {"qweight": _pack_awq(q.reshape(-1, q.shape[-1])), "qzeros": _pack_awq(z.reshape(z.shape[0], -1)),
            "scales": tensors["scales"]}, dequantized


def write_gptq(src: str, dst: str, dequantized: str | None, bits: int, group_size: int, layout: str, sym: bool,
               desc_act: bool = False, edit=None, attention: bool = False) -> str:
    """Copy the tiny checkpoint `src` with its routed experts (and, with `attention`, the attention projections,
    as GPTQ quantizes every Linear of a block) in GPTQ's layout, and with `dequantized` the same model with those
    weights as GPTQ dequantizes them. edit(name, tensors): a hook to spoil one projection."""
    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, plain = {}, {}
    for name, tensor in state.items():
        if ".experts." not in name and not (attention and ".self_attn." in name and name.endswith("_proj.weight")):
            quantized[name] = plain[name] = tensor
            continue
        module = name.removesuffix(".weight")
        if layout == "awq":
            tensors, weight = awq_tensors(tensor, group_size)
        else:
            tensors, weight = gptq_tensors(tensor, bits, group_size, gptq.VERSIONS[layout], sym)
        if edit is not None:
            edit(module, tensors)
        quantized.update({f"{module}.{key}": value for key, value in tensors.items()})
        plain[name] = weight
    if layout == "awq":  # the keys AutoAWQ writes
        config = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                  "version": "gemm", "modules_to_not_convert": None}
    else:  # the keys GPTQModel / optimum write
        config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                  "checkpoint_format": layout, "damp_percent": 0.01, "true_sequential": True,
                  "static_groups": False}
    return save_quantized_pair(src, dst, dequantized, quantized, plain, config)


@pytest.fixture(scope="module")
def gptq_model(checkpoint_factory, tmp_path_factory):
    """scheme -> (GPTQ checkpoint, the same model dequantized), made once each."""
    made = {}

    def get(scheme: str) -> tuple[str, str]:
        if scheme not in made:
            root = tmp_path_factory.mktemp(scheme)
            bits, group_size, layout, sym = SCHEMES[scheme]
            made[scheme] = (write_gptq(checkpoint_factory(ARCH), str(root / "q"), str(root / "dq"), bits, group_size,
                                       layout, sym, attention=scheme in ATTENTION), str(root / "dq"))
        return made[scheme]

    return get


def _prompt() -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))  # [1, T]


def _run(path: str, **properties) -> tuple[torch.Tensor, torch.Tensor, dict]:
    pipe = LLMPipeline(path, "cpu", **properties)
    try:
        with torch.no_grad():
            logits = pipe.model(_prompt()).logits
        tokens = pipe.generate_tokens(_prompt(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        return logits, tokens, pipe.get_offload_stats()
    finally:
        pipe.close()


def _reference(dequantized: str) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(_prompt(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        return model(_prompt()).logits, tokens[0, _prompt().shape[1]:]


def test_int4_v1_matches_transformers_with_the_same_bits_at_every_ratio_and_tier(gptq_model):
    """GPTQ v1, symmetric int4, group 16, attention quantized too (dequantized at load, as GPTQ computes it):
    transformers' logits within ATOL and its greedy tokens; ratios 0 (every
    expert from host RAM), 37 from disk (host cache 0) and 100 (all resident) give the same bits, and each miss
    streams the format's bytes (the same as the GPTQ tensors: packed values, scales, zero points)."""
    path, dequantized = gptq_model("int4-g16-v1-sym")
    ref_logits, ref_tokens = _reference(dequantized)
    resident = _run(path, MOE_OFFLOAD_RATIO=100)
    assert (resident[0] - ref_logits).abs().max().item() <= ATOL
    assert torch.equal(resident[1], ref_tokens)
    # per expert: gate, up [16, 32] and down [32, 16]: qweight + qzeros as int32, scales float16
    gptq_bytes = 2 * (32 // 8 * 16 * 4 + 2 * 16 * 2 + 2 * 16 // 8 * 4) + (16 // 8 * 32 * 4 + 1 * 32 * 2 + 32 // 8 * 4)
    for ratio, tier in ((0, "host"), (37, "disk")):
        logits, tokens, stats = _run(path, MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE="auto" if tier == "host" else 0)
        assert torch.equal(logits, resident[0]) and torch.equal(tokens, resident[1])
        assert stats["expert_bytes"] == gptq_bytes
        assert stats["expert_format"] == "int4, group 16, asymmetric, float16 scales"
        streamed = stats["bytes_streamed"][tier]
        assert streamed == sum(stats["experts_streamed"].values()) * gptq_bytes > 0


def test_int8_v2_per_channel_with_zero_points_matches_transformers(gptq_model):
    """GPTQ v2 (zero points as they are), int8, group_size -1 (one scale per output column), asymmetric."""
    path, dequantized = gptq_model("int8-channel-v2-asym")
    ref_logits, ref_tokens = _reference(dequantized)
    logits, tokens, stats = _run(path, MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE=0)
    assert (logits - ref_logits).abs().max().item() <= ATOL
    assert torch.equal(tokens, ref_tokens)
    assert stats["expert_format"] == "int8, channel-wise, asymmetric, float16 scales"


def test_awq_gemm_matches_transformers(gptq_model):
    """AWQ (GEMM, int4, group 16, zero points), experts and attention: from disk at ratio 37, transformers'
    logits within ATOL on what AWQ computes, and its greedy tokens; from host RAM at ratio 0 the same bits; the
    bytes per expert are GPTQ's."""
    path, dequantized = gptq_model("awq-int4-g16")
    ref_logits, ref_tokens = _reference(dequantized)
    logits, tokens, stats = _run(path, MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE=0)
    assert (logits - ref_logits).abs().max().item() <= ATOL
    assert torch.equal(tokens, ref_tokens)
    from_host = _run(path, MOE_OFFLOAD_RATIO=0)
    assert torch.equal(from_host[0], logits) and torch.equal(from_host[1], tokens)
    assert stats["expert_bytes"] == 1008 and stats["expert_format"] == "int4, group 16, asymmetric, float16 scales"
    assert describe(Checkpoint(path))["quantization"]["format"] == "AWQ"


@pytest.mark.parametrize("bits, group_size, version", [(4, 8, 1), (4, -1, 2), (8, 16, 1), (8, 8, 2), (4, 8, "awq")])
def test_repack_gives_what_gptq_dequantizes(bits, group_size, version):
    """One expert's GPTQ (or AWQ) row, repacked (ExpertFormat.copy_row) into the engine's planes, dequantizes
    (reference.dequantize, then rounded to the scales' float16) to exactly what GPTQ's kernel computes."""
    torch.manual_seed(bits + group_size)
    inter, hidden = 16, 40
    weights = {"gate": torch.randn(inter, hidden), "up": torch.randn(inter, hidden), "down": torch.randn(hidden, inter)}
    made = {role: awq_tensors(w, group_size) if version == "awq" else gptq_tensors(w, bits, group_size, version, False)
            for role, w in weights.items()}
    spec = QuantSpec(bits, None if group_size == -1 else group_size, False)
    stored = ExpertFormat(inter, hidden, torch.float16, spec, "awq" if version == "awq" else f"gptq_v{version}")
    row = torch.zeros(stored.row_bytes, dtype=torch.uint8)
    for name, view in stored.plane_views(row).items():
        matrix, kind = name.split(".")
        roles = ("gate", "up") if matrix == "gate_up" else ("down",)
        view.copy_(torch.stack([made[role][0][kind] for role in roles]))
    held = stored.held()
    assert held.nbytes == stored.nbytes and held.source == ""
    engine_row = torch.zeros(held.row_bytes, dtype=torch.uint8)
    held.copy_row(engine_row, row, stored)
    gate_up, down = held.weights(engine_row)
    assert torch.equal(dequantize(gate_up).half().float(), torch.cat([made["gate"][1], made["up"][1]]))
    assert torch.equal(dequantize(down).half().float(), made["down"][1])


def test_info_names_gptq_and_its_bytes(gptq_model):
    path, dequantized = gptq_model("int4-g16-v1-sym")
    info = describe(Checkpoint(path))
    assert info["quantization"] == {"bits": 4, "group_size": 16, "symmetric": False, "format": "GPTQ v1"}
    assert {layer["expert_bytes"] for layer in info["layers"]} == {1008}  # g_idx is checked, not streamed
    assert "expert weights   int4, group size 16, with zero points (GPTQ v1)" in format_info(info)
    # the GPTQ attention is held dequantized (float16 here, the scales' dtype): counted so on the device
    plain = describe(Checkpoint(dequantized))["non_expert_bytes"]
    attention = 2 * (32 * 32 * 2 + 16 * 32 * 2) * 2  # per layer q, o [32, 32] and k, v [16, 32]: float32 -> float16
    assert info["non_expert_bytes"] == plain - attention


def test_a_dense_gptq_linear_follows_a_permuted_g_idx():
    """Outside the experts a GPTQ Linear is dequantized whole, so act-order's permuted g_idx is followed: the
    weight GPTQ's kernel computes, bit for bit (v1 and v2)."""
    from moe_offload.checkpoint import TensorEntry

    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    g_idx = (torch.arange(64) // 16)[torch.randperm(64)].to(torch.int32)
    for version, layout in ((1, "gptq"), (2, "gptq_v2")):
        tensors, want = gptq_tensors(weight, 4, 16, version, sym=False, g_idx=g_idx)
        entries = {k: TensorEntry(f"x.{k}", "", v.dtype, tuple(v.shape), 0, 0) for k, v in tensors.items()}
        scheme = gptq.gptq_scheme({"bits": 4, "group_size": 16, "desc_act": True, "checkpoint_format": layout})
        got = gptq.dense_weight(entries, lambda entry: tensors[entry.name[2:]], (24, 64), scheme, "x.weight")
        assert got.dtype == torch.float16 and torch.equal(got.float(), want)


# -- refused by name, in one line ------------------------------------------------------------------------------

def _config_edit(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"].update(changes)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


@pytest.mark.parametrize("changes, words", [
    ({"checkpoint_format": "marlin"}, "GPTQ checkpoint format 'marlin' is not supported (gptq or gptq_v2)"),
    ({"bits": 3}, "3-bit GPTQ weights are not supported (4 or 8 bits)"),
    ({"group_size": 0}, "GPTQ group_size 0 is not supported"),
    ({"dynamic": {"-:.*down_proj": {}}}, "GPTQ per-module overrides (quantization_config.dynamic)"),
    ({"group_size": 8}, "gate_proj.qzeros is int32 [2, 2], expected int32 [4, 2] for a [16, 32] weight at 4 bits, "
                        "group 8"),
])
def test_unsupported_gptq_configs_are_one_line(gptq_model, tmp_path, changes, words):
    import shutil

    path = shutil.copytree(gptq_model("int4-g16-v1-sym")[0], str(tmp_path / "bad"))
    _config_edit(path, **changes)
    checkpoint = Checkpoint(path)
    with pytest.raises(MoeOffloadError) as caught:
        checkpoint.expert_locations(0, 8, 32, 16)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_act_order_is_read_and_refused_only_when_it_permutes(checkpoint_factory, tmp_path):
    """desc_act with g_idx = k // group_size loads; a permuted g_idx is refused naming the tensor."""
    src = checkpoint_factory(ARCH)
    trivial = write_gptq(src, str(tmp_path / "t"), None, 4, 16, "gptq", True, desc_act=True)
    assert len(Checkpoint(trivial).expert_locations(1, 8, 32, 16)) == 8

    def permute(module, tensors):
        if module == "model.layers.1.mlp.experts.5.gate_proj":
            tensors["g_idx"] = tensors["g_idx"].flip(0).contiguous()

    permuted = write_gptq(src, str(tmp_path / "p"), None, 4, 16, "gptq", True, desc_act=True, edit=permute)
    with pytest.raises(MoeOffloadError, match=r"^model\.layers\.1\.mlp\.experts\.5\.gate_proj\.g_idx: GPTQ act-order "
                                              r"\(desc_act\) with a permuted g_idx is not supported$"):
        Checkpoint(permuted).expert_locations(1, 8, 32, 16)


def test_a_v1_zero_point_no_field_holds_is_one_line(checkpoint_factory, tmp_path):
    """v1 stores z - 1: a stored 15 at int4 would be z = 16. Refused when the expert is read (here at load: the
    host tier is filled then), never wrapped round to a wrong weight."""
    def overflow(module, tensors):
        if module == "model.layers.0.mlp.experts.2.up_proj":
            tensors["qzeros"][0, 0] = -1  # every field 15

    path = write_gptq(checkpoint_factory(ARCH), str(tmp_path / "o"), None, 4, 16, "gptq", False, edit=overflow)
    with pytest.raises(MoeOffloadError, match=r"^a GPTQ v1 zero point of 16 \(stored 15\) in gate_up: .* gptq_v2$"):
        LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=0)


def test_autogptqs_quantize_config_json_is_read(gptq_model, tmp_path):
    """Older AutoGPTQ exports keep the scheme in quantize_config.json beside a config.json without one."""
    import shutil

    path = shutil.copytree(gptq_model("int4-g16-v1-sym")[0], str(tmp_path / "legacy"))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    quant = config.pop("quantization_config")
    quant.pop("quant_method")
    for name, content in (("config.json", config), ("quantize_config.json", quant)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            json.dump(content, handle)
    checkpoint = Checkpoint(path)
    assert checkpoint.gptq == gptq.GptqScheme(QuantSpec(4, 16, False), 1, False)
    assert checkpoint.expert_locations(0, 8, 32, 16)[0].format.source == "gptq_v1"
