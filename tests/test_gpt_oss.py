"""GPT-OSS (transformers' GptOssForCausalLM), bf16 layout and native MXFP4, against transformers on CPU.

Tiny checkpoints (tests/tiny_models.py): two layers, one sliding-window (window 8, shorter than the prompt) and
one full, attention sinks, 8 experts top-2 with biases, weights large enough to reach the SwiGLU clamps.
- float32: max |logits difference| <= 1e-4 against transformers loading the same folder (the MXFP4 one with
  Mxfp4Config(dequantize=True), its own dequantization), 12 greedy tokens identical, and the logits bit-identical
  across ratios 0/37/100 with the experts in host RAM or read from the file.
- bfloat16: the logits bit-identical to transformers' at every placement (same rounding points, same matmul
  orientation).
"""

import json
import os
import re

import pytest
import torch
from tiny_models import make_gpt_oss_checkpoint, prompt_ids

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import MoeOffloadError
from moe_offload.quant import mxfp4
from moe_offload.tools.info import describe, format_info

ATOL = 1e-4
NEW_TOKENS = 12
PLACEMENTS = [(0, "auto"), (0, 0), (37, "auto"), (37, 0), (100, 0)]  # (ratio, MOE_HOST_CACHE): host or disk tier


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {kind: make_gpt_oss_checkpoint(str(tmp_path_factory.mktemp(f"gpt-oss-{kind}")), mxfp4=kind == "mxfp4")
            for kind in ("bf16", "mxfp4")}



def _transformers(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        quantized = "quantization_config" in json.load(handle)
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}  # no hub kernels on CPU
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()


@pytest.mark.parametrize("kind", ["bf16", "mxfp4"])
def test_matches_transformers_at_every_ratio_and_tier(checkpoints, kind):
    path, ids = checkpoints[kind], prompt_ids()
    reference = _transformers(path, torch.float32)
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_tokens = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    first = None
    for ratio, host_cache in PLACEMENTS:
        pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=host_cache)
        with torch.no_grad():
            logits = pipe.model(ids).logits
        diff = (logits - ref_logits).abs().max().item()
        assert diff <= ATOL, f"{kind} ratio {ratio}: max |logits diff| {diff:.3e} > {ATOL}"
        first = logits if first is None else first
        assert torch.equal(logits, first), f"{kind}: ratio {ratio}, host cache {host_cache} changed the bits"
        stats = pipe.get_offload_stats()
        streamed = stats["bytes_streamed"]
        if ratio < 100:
            assert stats["misses"] > 0 and (streamed["disk"] > 0) == (host_cache == 0)
        else:
            assert stats["misses"] == 0
        if ratio == 37:  # the static-cache decoder, its sliding-window layers masked (prompt 13 > window 8)
            assert pipe.decoder is not None
            tokens = pipe.generate_tokens(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                          do_sample=False)
            assert torch.equal(tokens, ref_tokens[0, ids.shape[1]:]), f"{kind}: greedy tokens differ"
            with torch.no_grad():  # and transformers' generate over our experts (what sampling would take)
                theirs = pipe.model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                             do_sample=False)
            assert torch.equal(theirs, ref_tokens)
        pipe.close()


@pytest.mark.parametrize("kind", ["bf16", "mxfp4"])
def test_bfloat16_is_bit_identical_to_transformers(checkpoints, kind):
    """In bf16 the logits equal transformers' (its MXFP4 dequantized at load) bit for bit, at every placement."""
    path, ids = checkpoints[kind], prompt_ids()
    with torch.no_grad():
        ref_logits = _transformers(path, torch.bfloat16)(ids).logits
        for ratio, host_cache in PLACEMENTS:
            pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=host_cache, MOE_DTYPE="bfloat16")
            assert torch.equal(pipe.model(ids).logits, ref_logits), f"ratio {ratio}, host cache {host_cache}"
            pipe.close()


def test_mxfp4_experts_stay_mxfp4_in_every_tier(checkpoints):
    """What is resident, in host RAM and read from the file is the checkpoint's bytes: 4.25 bits per weight."""
    pipe = LLMPipeline(checkpoints["mxfp4"], "cpu", MOE_OFFLOAD_RATIO=50)
    fmt = pipe.layers[0].format
    assert {layer.format for layer in pipe.layers} == {fmt}
    weights = 2 * 32 * 64 + 64 * 32  # gate_up [2I, H] + down [H, I]
    biases = (2 * 32 + 64) * 2  # bf16
    assert fmt.nbytes == weights * 4.25 / 8 + biases
    assert fmt.describe().startswith("mxfp4")


def test_mxfp4_round_trip_is_exact():
    """quantize -> dequantize reproduces e2m1 x 2^e values exactly, low nibble first, as transformers decodes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weight = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))  # [E, N, K]
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.shape == (2, 6, 2, 16) and scales.shape == (2, 6, 2)
    ours = torch.stack([mxfp4.dequantize(blocks[e], scales[e]) for e in range(2)])  # [E, N, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, K, N] -> [E, N, K]
    assert torch.equal(ours, theirs)
    assert (ours - weight).abs().max() <= weight.abs().max() / 6  # within half an e2m1 step of the block peak


def test_info_reports_the_format(checkpoints):
    for kind, words in (("bf16", "GPT-OSS"), ("mxfp4", "mxfp4")):
        info = describe(Checkpoint(checkpoints[kind]))
        assert words in format_info(info)
    info = describe(Checkpoint(checkpoints["mxfp4"]))
    assert info["quantization"]["format"] == "mxfp4"
    assert info["layers"][0]["expert_bytes"] == (2 * 32 * 64 + 64 * 32) * 17 // 32 + (2 * 32 + 64) * 2


def _rewrite(src: str, dst: str, edit_state=None, edit_config=None) -> str:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return dst


@pytest.mark.parametrize("case, message", [
    ("no_bias", "lacks experts.down_proj_bias"),
    ("blocks_without_config", "MXFP4 quantization (tensor model.layers.0.mlp.experts.gate_up_proj_blocks) "
                              "cannot be read"),
    ("bad_scales_dtype", "down_proj_scales has dtype"),
    ("wrong_shape", "expected float [8, 64, 64]"),
])
def test_bad_checkpoints_are_one_line(checkpoints, tmp_path, case, message):
    def edit(state):
        if case == "no_bias":
            for name in [n for n in state if n.endswith("down_proj_bias")]:
                del state[name]
        elif case == "bad_scales_dtype":
            for name in [n for n in state if n.endswith("down_proj_scales")]:
                state[name] = state[name].to(torch.int16)
        elif case == "wrong_shape":
            for name in [n for n in state if n.endswith("gate_up_proj")]:
                state[name] = state[name][:, :, :32].contiguous()

    def drop_config(config):
        config.pop("quantization_config")

    src = checkpoints["mxfp4" if case in ("blocks_without_config", "bad_scales_dtype") else "bf16"]
    path = _rewrite(src, str(tmp_path / case), edit, drop_config if case == "blocks_without_config" else None)
    with pytest.raises(MoeOffloadError, match=re.escape(message)):
        LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=0)


def test_cli_info_and_generate(checkpoints, capsys):
    from moe_offload.cli import main

    path = checkpoints["mxfp4"]
    assert main(["info", path]) == 0
    assert "mxfp4" in capsys.readouterr().out
    assert main(["generate", "-m", path, "-d", "cpu", "--ratio", "37", "--host-cache", "0", "-n", "4", "--stats",
                 "def f"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "error" not in err


def test_triton_path_in_the_engine(checkpoints):
    """The engine with the Triton kernels (CPU: Triton's interpreter, so MXFP4 only and a short prompt; the
    kernels' own tests cover bf16 pools, the grouped GEMMs and the host pool's bits) at ratio 37 on its direct
    path: misses read in place from the host tier and admitted read-through by the device LRU, within ATOL of
    transformers over a prompt and a decode step."""
    pytest.importorskip("triton")
    from moe_offload.kernels.triton_moe import fused_moe

    path, ids = checkpoints["mxfp4"], prompt_ids()[:, :5]
    reference = _transformers(path, torch.float32)
    generate = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        ref_logits = torch.stack(reference.generate(ids, **generate).logits)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device, lru=True) and layer.lru_admission
    with torch.no_grad():
        logits = torch.stack(pipe.model.generate(ids, **generate).logits)
    stats = pipe.get_offload_stats()
    assert stats["kernel"] == "triton" and stats["experts_read_in_place"] > 0 and stats["hits"] > 0
    assert (logits - ref_logits).abs().max().item() <= ATOL


def test_cpu_expert_path_refuses_gpt_oss_by_reason(checkpoints):
    """The hybrid CPU kernels compute SiLU experts without bias: GPT-OSS's are refused by name (auto: off)."""
    with pytest.raises(MoeOffloadError, match="MOE_CPU_EXPERTS=all is not possible here: GPT-OSS's experts"):
        LLMPipeline(checkpoints["mxfp4"], "cpu", MOE_OFFLOAD_RATIO=0, MOE_CPU_EXPERTS="all")
