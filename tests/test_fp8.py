"""FP8 block-quantized checkpoints (Qwen3-...-FP8, DeepSeek-V3 layout) end to end on the CPU: parsed and checked,
held and moved as FP8 bytes plus block scales in every tier, computed by the torch reference path, the other FP8
projections dequantized at load.

Two tiny Qwen3-MoE checkpoints written in the exact layout (fp8_models.py), blocks of 8x8:
- "odd": experts of I = 20, which no block divides, so gate's and up's scale blocks do not continue each other
  in gate_up (the up rows' blocks start at scale row ceil(20/8) = 3, not 20 // 8 = 2) and every last block is
  short. transformers' own FP8 dequantize cannot load it (it needs blocks to divide the shapes), so the reference
  is transformers' model class on the test's own dequantization of the same tensors.
- "even": I = 16, every block whole, bf16 scales (as some Qwen3 FP8 exports store them): transformers loads the
  FP8 checkpoint itself on the CPU (its FineGrainedFP8 quantizer dequantizes there) and is the reference, so the
  product is rounded once, to the compute dtype, not first to the scales' bf16.
In float32 compute the logits agree within ATOL (summation order only); in bf16 compute (the dequantized weights
rounded to bf16, as transformers' dequantizing load holds them) they are the same bits.
"""

import json
import os
import shutil

import pytest
import torch
from fp8_models import dequantize_block, make_source, quantize_fp8
from safetensors.torch import load_file, save_file
from slot_checks import admit_on_the_device, misplaced
from tiny_models import TIERS, prompt_ids

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload.cli import main
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat, FP8Matrix
from moe_offload.kernels.reference import dense, dequantize
from moe_offload.quant.fp8 import BlockFP8Spec
from moe_offload.tools.info import describe

BLOCK = (8, 8)
HIDDEN = 32
INTER = {"odd": 20, "even": 16}
RATIOS = [0, 37, 100]
# float32 compute on both sides over the same dequantized weights: only the summation order of the experts'
# outputs differs (as in test_quantized.py); measured 3e-8 / 4.5e-8 against logits of ~0.4
ATOL = 1e-4



@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """kind -> (FP8 checkpoint, the same weights dequantized, unquantized), made once each."""
    made = {}

    def get(kind: str) -> tuple[str, str]:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"fp8-{kind}")
            source = make_source(str(root / "src"), INTER[kind])
            scales = torch.bfloat16 if kind == "even" else torch.float32
            made[kind] = quantize_fp8(source, str(root / "q"), BLOCK, str(root / "dq"), scales)
        return made[kind]

    return get


def test_checkpoint_locates_each_expert_plane_by_plane(fp8):
    path, _ = fp8("odd")
    checkpoint = Checkpoint(path)
    assert checkpoint.quantization == BlockFP8Spec(8, 8)
    locations = checkpoint.expert_locations(0, 8, HIDDEN, 20)
    fmt = locations[0].format
    assert fmt == ExpertFormat(20, HIDDEN, torch.float32, BlockFP8Spec(8, 8))
    assert [(p.name, p.shape, p.dtype) for p in fmt.planes] == [
        ("gate_up.weight", (40, 32), torch.float8_e4m3fn), ("gate_up.scale", (6, 4), torch.float32),  # 3 + 3 rows
        ("down.weight", (32, 20), torch.float8_e4m3fn), ("down.scale", (4, 3), torch.float32)]
    assert all(p.offset % 16 == 0 for p in fmt.planes)
    names = {(e.path, e.start): e.name for e in checkpoint.tensors.values()}
    expert = "model.layers.0.mlp.experts.3"
    assert [names[(r.path, r.start)] for r in locations[3].planes[1]] == [
        f"{expert}.gate_proj.weight_scale_inv", f"{expert}.up_proj.weight_scale_inv"]
    assert locations[3].nbytes == fmt.nbytes == 3 * 20 * 32 + 4 * (2 * 3 * 4 + 4 * 3)  # 1 byte a weight + scales
    assert fmt.describe() == "fp8 e4m3, blocks 8x8, float32 scales"
    # the attention projections are FP8 too, read with their scales and dequantized at load
    assert checkpoint.fp8_dense["model.layers.1.self_attn.o_proj.weight"] == \
        "model.layers.1.self_attn.o_proj.weight_scale_inv"
    assert not any(".experts." in name or "mlp.gate." in name for name in checkpoint.fp8_dense)


def test_the_engine_dequantizes_what_the_test_dequantizes(fp8):
    """reference.dequantize over an expert's slot (gate and up stacked, each with its own short blocks) and the
    attention weights the load dequantized equal the test's own float(fp8) * scale, bit for bit."""
    path, _ = fp8("odd")
    state = load_file(os.path.join(path, "model.safetensors"))

    def want(module: str) -> torch.Tensor:
        return dequantize_block(state[f"{module}.weight"], state[f"{module}.weight_scale_inv"], BLOCK)

    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    try:
        layer = pipe.layers[1]
        weights = layer.format.weights(layer.slots[layer.table.lookup(5)])
        assert isinstance(weights.gate_up, FP8Matrix)
        expert = "model.layers.1.mlp.experts.5"
        assert torch.equal(dequantize(weights.gate_up), torch.cat([want(f"{expert}.gate_proj"),
                                                                  want(f"{expert}.up_proj")]))
        assert torch.equal(dequantize(weights.down), want(f"{expert}.down_proj"))
        assert torch.equal(dense(weights.down, torch.bfloat16), want(f"{expert}.down_proj").to(torch.bfloat16))
        assert torch.equal(pipe.model.model.layers[0].self_attn.k_proj.weight, want("model.layers.0.self_attn.k_proj"))
    finally:
        pipe.close()


@pytest.mark.parametrize("kind,dtype", [("odd", "float32"), ("even", "float32"), ("odd", "bfloat16")])
def test_matches_transformers(fp8, kind, dtype):
    """odd: transformers' model on the test's dequantized weights; even: transformers loading the FP8 checkpoint
    itself (its CPU dequantize). float32: logits within ATOL; bfloat16 (the dequantized weights rounded to bf16,
    transformers' eager experts): the same bits. The same greedy tokens; our backend runs the experts."""
    from transformers import AutoModelForCausalLM

    path, dequantized = fp8(kind)
    ids = prompt_ids()
    model = AutoModelForCausalLM.from_pretrained(dequantized if kind == "odd" else path, dtype=getattr(torch, dtype),
                                                 experts_implementation="eager").eval()
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37, MOE_DTYPE=dtype)
    try:
        with torch.no_grad():
            ref_logits, logits = model(ids).logits, pipe.model(ids).logits
            ref_tokens = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        if dtype == "bfloat16":
            assert torch.equal(logits, ref_logits)
        if kind == "even":  # transformers' own FP8 load holds the very weights we compute with (bf16 scales)
            layer, theirs = pipe.layers[1], model.model.layers[1]
            for expert in range(8):
                row = layer.host.row_of[expert]
                gate_up, down = layer.host.gate_up[row], layer.host.down[row]
                assert torch.equal(dense(gate_up, torch.float32), theirs.mlp.experts.gate_up_proj[expert])
                assert torch.equal(dense(down, torch.float32), theirs.mlp.experts.down_proj[expert])
            assert torch.equal(pipe.model.model.layers[1].self_attn.o_proj.weight, theirs.self_attn.o_proj.weight)
        assert (logits - ref_logits).abs().max().item() <= ATOL
        tokens = pipe.generate_tokens(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, ref_tokens[0, ids.shape[1]:])
        # our backend computed the experts: the quantizer that would swap in transformers' FP8Experts (behind
        # ALL_FP8_EXPERTS_FUNCTIONS, not ALL_EXPERTS_FUNCTIONS) runs only in from_pretrained, never on our load
        from transformers.integrations.finegrained_fp8 import FP8Experts

        assert not any(isinstance(m, FP8Experts) for m in pipe.model.modules())
        assert pipe.model.config._experts_implementation == "moe_offload"
        assert pipe.get_offload_stats()["misses"] > 0
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def resident(fp8):
    """Logits and greedy tokens of the odd checkpoint fully resident."""
    pipe = LLMPipeline(fp8("odd")[0], "cpu", MOE_OFFLOAD_RATIO=100)
    with torch.no_grad():
        logits = pipe.model(prompt_ids()).logits
    tokens = pipe.generate_tokens(prompt_ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    pipe.close()
    return logits, tokens


@pytest.mark.parametrize("ratio,tier", [(ratio, tier) for ratio in RATIOS for tier in TIERS
                                        if ratio < 100 or tier == "host"])  # at 100 nothing is offloaded
def test_every_ratio_and_tier_gives_the_resident_bits(fp8, resident, ratio, tier):
    """Offloaded FP8 experts give the very bits of the fully resident model, and what moves is the FP8 bytes:
    each miss streams one expert's weights (1 byte each) and block scales."""
    logits, tokens = resident
    pipe = LLMPipeline(fp8("odd")[0], "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=TIERS[tier])
    try:
        with torch.no_grad():
            assert torch.equal(pipe.model(prompt_ids()).logits, logits)
        assert torch.equal(pipe.generate_tokens(prompt_ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False),
                           tokens)
        stats = pipe.get_offload_stats()
        assert stats["expert_bytes"] == 3 * 20 * 32 + 4 * 36  # FP8 weights + float32 scales
        assert stats["expert_format"] == "fp8 e4m3, blocks 8x8, float32 scales"
        streamed = stats["bytes_streamed"][tier]
        assert streamed == sum(stats["experts_streamed"].values()) * stats["expert_bytes"]
        assert (streamed > 0) == (ratio < 100)
    finally:
        pipe.close()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels on CPU tensors need Triton's interpreter")
def test_the_triton_kernels_run_the_engine_with_read_through_admission(fp8):
    """Zero-copy with device LRU (Triton's interpreter on the CPU): FP8 misses read in place from the host tier's
    rows and admitted into slots as read give the tokens of the torch reference path; each slot then holds its
    expert's bytes and scales bit for bit."""
    pytest.importorskip("triton")
    from moe_offload.kernels.triton_moe import fused_moe

    prompt = prompt_ids()[:, :9]  # 18 (token, expert) pairs: the prefill takes the grouped GEMMs, decode the GEMVs
    resident = LLMPipeline(fp8("odd")[0], "cpu", MOE_OFFLOAD_RATIO=100)
    tokens = resident.generate_tokens(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    resident.close()
    pipe = LLMPipeline(fp8("odd")[0], "cpu", MOE_OFFLOAD_RATIO=25)
    try:
        admit_on_the_device(pipe, fused_moe)
        assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False), tokens)
        stats = pipe.get_offload_stats()
        assert stats["experts_read_in_place"] == stats["misses"] > 0
        assert stats["bytes_read_in_place"] == stats["misses"] * pipe.layers[0].format.nbytes
        assert all(misplaced(layer) == [] for layer in pipe.layers)
    finally:
        pipe.close()


def test_info_shows_the_format_and_the_fp8_bytes(fp8, capsys):
    path, _ = fp8("odd")
    info = describe(Checkpoint(path))
    assert info["quantization"] == {"format": "fp8", "weight_dtype": "float8_e4m3fn", "block": [8, 8],
                                    "scale_dtype": "float32"}
    assert {layer["expert_bytes"] for layer in info["layers"]} == {3 * 20 * 32 + 4 * 36}
    # attention dequantized at load: counted in the compute dtype, scales not kept
    plain = describe(Checkpoint(fp8("odd")[1]))
    assert info["non_expert_bytes"] == plain["non_expert_bytes"]
    capsys.readouterr()
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "expert weights   fp8 e4m3, blocks 8x8, float32 scales" in out
    assert "bytes/expert     2064 (2.02 KiB)" in out


def test_generate_runs_from_the_command_line(fp8, capsys):
    path, _ = fp8("odd")
    capsys.readouterr()
    assert main(["generate", "def f", "--device", "cpu", "-n", "3", "--ratio", "25", "--model", path]) == 0
    assert capsys.readouterr().out.startswith("def f")


@pytest.mark.parametrize("compute", ["numba", "float32", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_cpu_expert_kernels_take_fp8_experts(fp8, compute, dtype):
    """CpuExperts on a host tier's FP8 rows against the reference: "native" is its own ops (the same bits),
    "float32" dequantizes block by block of rows (accumulation order only: 1e-5 in float32, 4 bf16 ulps),
    "numba" decodes the codes in its dot products, scaling each block's sum once (float32: within 1e-5 too, its
    weights are the reference's; bf16: the reference rounds the weights to bf16, numba does not)."""
    from moe_offload.hybrid import CpuExperts
    from moe_offload.hybrid.tuning import cpu_expert_kernels
    from moe_offload.hybrid.kernels import cpu_numba
    from moe_offload.kernels.reference import weighted_expert_output

    if compute == "numba":
        pytest.importorskip("numba")
    offered = cpu_expert_kernels(torch.float32, torch.nn.functional.silu, True, fp8=True)
    assert offered == (["numba", "float32"] if cpu_numba.available() else ["float32"])
    pipe = LLMPipeline(fp8("odd")[0], "cpu", MOE_OFFLOAD_RATIO=0, MOE_CPU_EXPERTS="off")
    try:
        host = pipe.layers[0].host  # every expert of the layer, FP8 rows
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(4, HIDDEN, generator=gen).to(dtype)  # [P, H]: pairs grouped by expert
        w = torch.rand(4, generator=gen).to(dtype)  # [P]
        slots, counts = [host.row_of[5], host.row_of[2], host.row_of[7]], [2, 1, 1]
        out = CpuExperts(threads=1, compute=compute, block_bytes=512)(x, w, host.gate_up, host.down, slots, counts)
        starts = [0, 2, 3, 4]
        want = torch.cat([weighted_expert_output(x[a:b], w[a:b], host.gate_up[slot], host.down[slot],
                                                 torch.nn.functional.silu)
                          for slot, a, b in zip(slots, starts, starts[1:])])  # [P, H], expert by expert
        if compute == "native":
            assert torch.equal(out, want)
        else:
            tolerance = 1e-5 if dtype == torch.float32 else 2.0 ** -6
            assert (out - want).abs().max().item() <= tolerance * want.abs().max().item()
    finally:
        pipe.close()


@pytest.mark.parametrize("codes", ["finite", "subnormal"])
def test_the_numba_kernel_decodes_every_e4m3_code(codes):
    """numba's FP8 experts against the float32 path's (exact dequantization), float32 compute, within float32
    rounding: weights drawn from every finite code, or only from the subnormal ones (S.0000.mmm, 2^-9 m: the
    decode's float32 subnormals), so a code decoded wrong shows; H 75 and I 21 cut the 16 x 32 blocks."""
    pytest.importorskip("numba")
    from moe_offload.hybrid import CpuExperts
    from moe_offload.tiers import HostTier

    hidden, inter = 75, 21
    tier = HostTier(list(range(3)), ExpertFormat(inter, hidden, torch.float32, BlockFP8Spec(16, 32)), pin=False)
    allowed = torch.tensor([c for c in range(256) if (c & 0x7F) != 0x7F and (codes == "finite" or (c & 0x78) == 0)])
    gen = torch.Generator().manual_seed(5)
    planes = tier.format.plane_views(tier.rows)
    for matrix, cols in (("gate_up", hidden), ("down", inter)):
        weight = planes[f"{matrix}.weight"].view(torch.uint8)
        weight.copy_(allowed[torch.randint(0, len(allowed), weight.shape, generator=gen)].to(torch.uint8))
        scale = planes[f"{matrix}.scale"]
        scale.copy_((torch.rand(scale.shape, generator=gen) + 0.5) * (50.0 if codes == "subnormal" else 0.02))
    x = torch.randn(3, hidden, generator=gen)  # [P, H]
    w = torch.rand(3, generator=gen)  # [P]
    slots, counts = [2, 0], [2, 1]
    with CpuExperts(threads=1, compute="numba") as numba, CpuExperts(threads=1, compute="float32") as exact:
        got, want = numba(x, w, tier.gate_up, tier.down, slots, counts), exact(x, w, tier.gate_up, tier.down, slots,
                                                                                counts)
    assert want.abs().max() > 0
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU-device pipelines with the Triton kernels interpreted")
def test_moe_cpu_experts_all_computes_fp8_misses_on_the_cpu(fp8, monkeypatch):
    """MOE_CPU_EXPERTS=all: every zero-copy miss computed on the CPU from the host tier's FP8 rows, with the
    resident model's greedy tokens, counted in FP8 bytes."""
    from moe_offload import integration
    from moe_offload.hybrid.kernels import cpu_numba
    from moe_offload.kernels.triton_moe import fused_moe

    path = fp8("odd")[0]
    prompt = prompt_ids()[:, :5]
    resident = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    want = resident.generate_tokens(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    resident.close()
    monkeypatch.setattr(integration, "select_kernel", lambda config, device, hf_config: fused_moe)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="all", MOE_CPU_THREADS=1)
    try:
        assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False), want)
        stats = pipe.get_offload_stats()
        kernel = "numba" if cpu_numba.available() else "float32"  # the preferred kernel (tuning.cpu_expert_kernels)
        assert stats["cpu_expert_layers"] == len(pipe.layers) and stats["cpu_expert_kernel"] == kernel
        assert stats["experts_computed_on_cpu"] > 0
        assert stats["bytes_computed_on_cpu"] == stats["experts_computed_on_cpu"] * pipe.layers[0].format.nbytes
    finally:
        pipe.close()


# -- bad input: one line, at load ----------------------------------------------------------------------------------

def _copy(fp8, tmp_path) -> str:
    return shutil.copytree(fp8("odd")[0], str(tmp_path / "bad"))


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_quant(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"].update(changes)
    if config["quantization_config"]["quant_method"] is None:
        del config["quantization_config"]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


EXPERT = "model.layers.1.mlp.experts.6.up_proj"
ATTENTION = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("damage,words", [
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{EXPERT}.weight_scale_inv": torch.ones(3, 3)})),
     rf"^{EXPERT}.weight_scale_inv is float32 \[3, 3\], expected floating point \[3, 4\] for a \[20, 32\] weight "
     r"in FP8 blocks of 8x8$"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{ATTENTION}.weight_scale_inv": torch.ones(4, 3)})),
     rf"^{ATTENTION}.weight_scale_inv is float32 \[4, 3\], expected floating point \[4, 4\]"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{EXPERT}.weight_scale_inv": torch.ones(3, 4).int()})),
     rf"^{EXPERT}.weight_scale_inv has dtype I32, which this tensor cannot have \(expected BF16, F16 or F32\)$"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{EXPERT}.weight_scale_inv": torch.ones(3, 4).half()})),
     r"^expert 6 of layer 1 mixes scale dtypes"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{EXPERT}.weight": t[f"{EXPERT}.weight"].float()})),
     rf"^{EXPERT}.weight has dtype F32, which this tensor cannot have \(expected F8_E4M3\)$"),
    (lambda p: _edit_tensors(p, lambda t: t.pop(f"{EXPERT}.weight_scale_inv")),
     rf"^{EXPERT}.weight has dtype F8_E4M3, which this tensor cannot have"),
    (lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.0.x_proj.weight_scale_inv": torch.ones(1)})),
     r"^model.layers.0.x_proj.weight_scale_inv is an FP8 block scale, but there is no FP8 weight beside it"),
    (lambda p: _edit_quant(p, weight_block_size=[8]), r"weight_block_size must be two positive integers"),
    (lambda p: _edit_quant(p, weight_block_size=[16, 8]),
     r"k_proj.weight_scale_inv is float32 \[2, 4\], expected floating point \[1, 4\] for a \[16, 32\] weight in FP8 "
     r"blocks of 16x8$"),
    (lambda p: _edit_quant(p, activation_scheme="static"), r"FP8 activation_scheme 'static' is not supported"),
    (lambda p: _edit_quant(p, quant_method="fbgemm_fp8"), r"^FBGEMM FP8 quantization .* is not supported"),
    (lambda p: _edit_quant(p, quant_method=None),
     r"^FP8 quantization \(tensor .*\) cannot be read: config.json has no quantization_config"),
])
def test_bad_fp8_checkpoints_are_one_line(fp8, tmp_path, damage, words):
    path = _copy(fp8, tmp_path)
    damage(path)
    with pytest.raises(MoeOffloadError, match=words) as caught:
        LLMPipeline(path, "cpu")
    assert "\n" not in str(caught.value)
