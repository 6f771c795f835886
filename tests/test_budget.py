"""Fit by memory (moe_offload/budget.py): the plan's arithmetic against numbers worked out by hand on the tiny
Qwen3-MoE (bf16 and int4), its exact terms against what a load allocates, the ratio a budget chooses (the largest
that fits: one more step does not), MOE_OFFLOAD_RATIO=AUTO, and the one-line errors.

The tiny Qwen3-MoE (tiny_models.py): 2 layers, both MoE, of 8 experts, top-2, H = 32, I = 16, 4 heads of 8, 2 KV
heads, vocabulary 320, untied, 256 positions.
"""

import dataclasses
import json
import logging
import os

import pytest
import torch
from tiny_models import ARCHITECTURES, quantize_experts

from moe_offload import LLMPipeline, budget, defaults
from moe_offload.checkpoint import Checkpoint
from moe_offload.cli import main
from moe_offload.config import OffloadConfig, make_config
from moe_offload.errors import MoeOffloadError
from moe_offload.integration import check_supported, model_facts
from moe_offload.quant.format import QuantSpec

ARCH = "qwen3_moe"
MiB = 2**20
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # plans are arithmetic: no GPU is needed to plan for one


def _facts(path: str, device: torch.device = CUDA, **properties) -> budget.ModelFacts:
    checkpoint = Checkpoint(path)
    return model_facts(checkpoint, check_supported(checkpoint), device, make_config(properties, environ={}))[3]


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory(ARCH)


@pytest.fixture(scope="module")
def int4(tiny, tmp_path_factory):
    return quantize_experts(tiny, str(tmp_path_factory.mktemp("int4") / "q"), QuantSpec(4, 16, True))


# -- facts and plans, by hand --------------------------------------------------------------------------------------

def test_facts_of_the_tiny_model_in_bf16(tiny):
    facts = _facts(tiny, MOE_DTYPE="bfloat16")
    assert facts.experts == (8, 8) and facts.top_k == 2 and facts.itemsize == 2 and facts.max_positions == 256
    assert facts.row_bytes == 2 * 16 * 32 * 2 + 32 * 16 * 2  # gate_up [2I, H] + down [H, I] in bf16 = 3072
    assert facts.embedding_bytes == 320 * 32 * 2
    # per layer: q_proj, o_proj [32, 32]; k_proj, v_proj [16, 32]; router [8, 32]; q/k norms [8]; 2 norms [32]
    layer = 2 * 32 * 32 + 2 * 16 * 32 + 8 * 32 + 2 * 8 + 2 * 32
    params = 2 * 320 * 32 + 2 * layer + 32  # embedding, lm_head (untied), final norm
    rotary = 2 * 4 * 4  # the rotary embedding's inv_freq and original_inv_freq: head_dim / 2 float32 values each
    assert facts.weight_bytes == 2 * params + rotary
    assert facts.kv_bytes_per_position == 2 * 2 * (2 * 8) * 2  # layers x (K, V) x kv heads x head_dim x bf16
    assert facts.position_bytes == 2 * 2 * (4 * 8)  # K and V repeated to 4 heads for SDPA, bf16
    attention = 2 * (3 * 32 + 3 * 16 + 32)  # q, k, v, rotary copies of q and k, SDPA's output, o_proj
    routed = 4 * (2 * 32 + 32 + 2 * 8) + 2 * 8 + 2 * 2 * 3 * 16  # f32 outputs and scores, logits, [2I + I] x K
    assert facts.token_bytes == 2 * 2 * 32 + 3 * 4 * 32 + max(attention, routed)  # residual, output, f32 norm


def test_facts_of_an_int4_checkpoint_count_its_packed_bytes(int4):
    facts = _facts(int4)  # the checkpoint's float32 dense weights: the compute dtype on CUDA
    # int4, group 16, bf16 scales: gate_up packed int32 [32, 4] + scale [32, 2]; down packed [32, 2] + scale [32, 1]
    assert facts.row_bytes == 32 * 4 * 4 + 32 * 2 * 2 + 32 * 2 * 4 + 32 * 1 * 2 == 960
    assert facts.itemsize == 4 and facts.kv_bytes_per_position == 2 * 2 * 16 * 4


def _hand_facts(**changes) -> budget.ModelFacts:
    facts = budget.ModelFacts(weight_bytes=100_000, embedding_bytes=20_000, embedding_reason=None, experts=(8, 8),
                              row_bytes=3072, top_k=2, kv_bytes_per_position=128, token_bytes=1000,
                              position_bytes=128, itemsize=2, max_positions=256)
    return dataclasses.replace(facts, **changes)


def test_a_plan_by_hand_on_cuda():
    plan = budget.plan(_hand_facts(), 37, 200, CUDA)
    positions = 256  # 200 rounded up to the decoder's cache bucket
    prefill = 200 * 1000 + positions * 128 + 200 * positions * 3  # tokens, expanded K/V, bool + bf16 mask
    graph = 4 * prefill  # 4 prefill graphs of the whole prompt: 200 tokens <= 64 * 8 / 2 pairs a layer reads in place
    step = 1000 + positions * 128 + positions * 3  # the decode step's graph
    assert plan.terms == {"weights": 100_000 - 20_000,  # the embedding table goes to host RAM (ratio < 100)
                          "experts": 2 * 3 * 3072,  # floor(8 * 0.37 + 0.5) = 3 per layer
                          "kv_cache": positions * 128, "scratch": 2 * 2 * 3072, "activations": prefill,
                          "graphs": graph + step, "runtime": budget.RUNTIME_BYTES}
    assert plan.total == sum(plan.terms.values()) and plan.resident == 6 and (plan.ratio, plan.context) == (37, 200)


def test_at_ratio_100_nothing_streams_and_the_table_stays():
    plan = budget.plan(_hand_facts(), 100, 256, CUDA)
    assert plan.terms["weights"] == 100_000 and plan.terms["scratch"] == 0 and plan.terms["experts"] == 16 * 3072
    assert plan.terms["graphs"] == 4 * budget.activation_bytes(_hand_facts(), 256, 256) + budget.activation_bytes(
        _hand_facts(), 1, 256)  # every layer direct: any prompt length is captured


def test_on_a_cpu_there_is_no_runtime_graphs_or_host_embeddings():
    plan = budget.plan(_hand_facts(), 0, 256, CPU)
    assert plan.terms["runtime"] == plan.terms["graphs"] == plan.terms["experts"] == 0
    assert plan.terms["weights"] == 100_000


def test_a_tied_table_stays_on_the_device():
    facts = _hand_facts(embedding_reason="the table is tied to the output layer")
    assert budget.plan(facts, 0, 256, CUDA).terms["weights"] == 100_000


def test_context_defaults_to_the_model_capped():
    assert budget.context_tokens(_hand_facts(), None) == 256
    assert budget.context_tokens(_hand_facts(max_positions=40960), None) == budget.DEFAULT_CONTEXT_CAP == 4096
    assert budget.context_tokens(_hand_facts(max_positions=None), None) == 4096
    assert budget.context_tokens(_hand_facts(), 100) == 100
    with pytest.raises(MoeOffloadError, match="MOE_CONTEXT=300 is more than the model's 256 positions"):
        budget.context_tokens(_hand_facts(), 300)


# -- the ratio a budget gives ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", [CUDA, CPU])
def test_the_chosen_ratio_is_the_largest_that_fits(device):
    facts = _hand_facts()
    totals = {r: budget.plan(facts, r, 256, device).total for r in range(101)}
    for budget_bytes in sorted(set(totals.values())) + [totals[37] + 1, totals[0], totals[100] + 10**6]:
        chosen = budget.fit(facts, budget_bytes, 256, device, "test")
        assert chosen.total <= budget_bytes
        assert all(totals[r] > budget_bytes for r in range(chosen.ratio + 1, 101))  # one more percent does not


def test_a_budget_below_ratio_0_fails_with_the_numbers():
    need = budget.plan(_hand_facts(), 0, 256, CUDA)
    with pytest.raises(MoeOffloadError) as err:
        budget.fit(_hand_facts(), need.total - 1, 256, CUDA, "MOE_DEVICE_MEMORY=1GiB")
    message = str(err.value)
    assert "\n" not in message and "MOE_DEVICE_MEMORY=1GiB cannot hold the model even at MOE_OFFLOAD_RATIO=0" in message
    assert need.summary() in message and "lower MOE_CONTEXT" in message


def test_auto_fits_the_free_device_memory_less_the_margin(monkeypatch):
    facts = _hand_facts()
    total, free = 8 * 2**30, 700 * MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    config, plan, choice = budget.resolve(OffloadConfig(moe_offload_ratio="auto"), facts, CUDA)
    margin = max(budget.AUTO_MARGIN_BYTES, int(total * budget.AUTO_MARGIN_FRACTION))
    want = budget.fit(facts, free - margin, 256, CUDA, "x", runtime=False)  # the context exists already
    assert config.moe_offload_ratio == plan.ratio == want.ratio and plan.terms["runtime"] == 0
    assert choice.name == "MOE_OFFLOAD_RATIO" and choice.value == str(want.ratio)
    assert "Test GPU" in choice.why and "largest ratio whose plan fits" in choice.why


def test_auto_on_a_cpu_is_100_and_says_why():
    config, plan, choice = budget.resolve(OffloadConfig(moe_offload_ratio="auto"), _hand_facts(), CPU)
    assert config.moe_offload_ratio == plan.ratio == 100 and choice.value == "100" and "CPU" in choice.why


def test_a_ratio_the_user_set_is_kept_and_planned():
    config, plan, choice = budget.resolve(OffloadConfig(moe_offload_ratio=25), _hand_facts(), CUDA)
    assert config.moe_offload_ratio == plan.ratio == 25 and choice is None


# -- properties ------------------------------------------------------------------------------------------------------

def test_the_properties_parse():
    config = make_config({"MOE_DEVICE_MEMORY": "8GiB", "MOE_CONTEXT": "2048"}, environ={})
    assert (config.moe_device_memory, config.moe_context, config.moe_offload_ratio) == (8 * 2**30, 2048, 100)
    assert make_config({"moe_offload_ratio": "AUTO"}, environ={}).moe_offload_ratio == "auto"
    assert make_config({"MOE_CONTEXT": "auto"}, environ={}).moe_context is None


@pytest.mark.parametrize("properties, words", [
    ({"MOE_DEVICE_MEMORY": "8GiB", "MOE_OFFLOAD_RATIO": 37}, "not both"),
    ({"moe_device_memory": "8GiB", "MOE_OFFLOAD_RATIO": "auto"}, "not both"),
    ({"MOE_DEVICE_MEMORY": "0"}, "MOE_DEVICE_MEMORY must be a positive byte count"),
    ({"MOE_DEVICE_MEMORY": "auto"}, "MOE_DEVICE_MEMORY must be a positive byte count"),
    ({"MOE_DEVICE_MEMORY": "lots"}, "MOE_DEVICE_MEMORY must be a byte count"),
    ({"MOE_CONTEXT": 0}, "MOE_CONTEXT must be a positive number of tokens"),
    ({"MOE_CONTEXT": "-5"}, "MOE_CONTEXT must be a positive number of tokens"),
    ({"MOE_CONTEXT": 2.5}, "MOE_CONTEXT must be a positive number of tokens"),
    ({"MOE_CONTEXT": True}, "MOE_CONTEXT must be a positive number of tokens"),
    ({"MOE_OFFLOAD_RATIO": "autox"}, "MOE_OFFLOAD_RATIO must be an integer 0-100 or AUTO"),
])
def test_bad_budget_properties_are_one_line(properties, words):
    with pytest.raises(MoeOffloadError, match=words):
        make_config(properties, environ={})


# -- loads: the plan's exact terms are what the load allocates ------------------------------------------------------

def _tensor_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_load_allocates_what_the_plan_says(tiny):
    pipe = LLMPipeline(tiny, "cpu", MOE_OFFLOAD_RATIO=37, MOE_CONTEXT=256)
    try:
        plan = pipe.memory_plan
        assert plan.terms["weights"] == _tensor_bytes(pipe.model)
        assert plan.terms["experts"] == sum(layer.device_bytes for layer in pipe.layers)
        assert plan.terms["scratch"] == pipe.layers[0].scratch.rows.numel()
        pipe.generate("def f(x):", max_new_tokens=3)  # the static decoder's cache: 256 positions
        cache = pipe.decoder.cache
        assert plan.terms["kv_cache"] == sum(t.numel() * t.element_size() for layer in cache.layers
                                             for t in (layer.keys, layer.values))
    finally:
        pipe.close()


@pytest.mark.parametrize("arch, dtype", [(arch, "float32") for arch in ARCHITECTURES] + [("deepseek_v3", "bfloat16")])
def test_every_architecture_allocates_the_planned_weights_and_kv_cache(checkpoint_factory, arch, dtype):
    """DeepSeek's MLA caches its latent, Mixtral/OLMoE/Qwen K and V of their KV heads; DeepSeek has dense layers,
    and in bf16 keeps what transformers holds in float32 (its router's weight and correction bias)."""
    pipe = LLMPipeline(checkpoint_factory(arch), "cpu", MOE_OFFLOAD_RATIO=50, MOE_DTYPE=dtype)
    try:
        plan = pipe.memory_plan
        assert plan.context == 256 and plan.terms["weights"] == _tensor_bytes(pipe.model)
        pipe.generate_tokens(torch.randint(2, 300, (1, 5)), max_new_tokens=2)
        assert plan.terms["kv_cache"] == sum(t.numel() * t.element_size() for layer in pipe.decoder.cache.layers
                                             for t in (layer.keys, layer.values))
    finally:
        pipe.close()


def test_a_quantized_load_allocates_its_packed_experts(int4):
    pipe = LLMPipeline(int4, "cpu", MOE_OFFLOAD_RATIO=50)
    try:
        assert pipe.memory_plan.terms["experts"] == sum(layer.device_bytes for layer in pipe.layers) == 8 * 960
    finally:
        pipe.close()


def test_a_device_memory_budget_loads_the_ratio_it_gives(tiny, caplog):
    facts = _facts(tiny, CPU)
    want = budget.plan(facts, 37, 256, CPU)
    with caplog.at_level(logging.INFO, logger="moe_offload"):
        pipe = LLMPipeline(tiny, "cpu", MOE_DEVICE_MEMORY=want.total)
    try:
        ratio = pipe.config.moe_offload_ratio
        assert ratio >= 37 and pipe.memory_plan.total == want.total  # 37 and the ratios that keep 3 of 8 alike
        assert budget.plan(facts, ratio + 1, 256, CPU).total > want.total
        assert sum(layer.table.capacity for layer in pipe.layers) == 6
        choice = pipe.choices[0]
        assert choice.name == "MOE_OFFLOAD_RATIO" and choice.value == str(ratio) and choice.line() in caplog.text
        assert f"ratio {ratio + 1} would need" in choice.why
    finally:
        pipe.close()


def test_the_load_says_where_offloaded_experts_live_and_warns_of_disk(tiny, caplog):
    row = 3 * 16 * 32 * 4  # float32 on the CPU
    with caplog.at_level(logging.INFO, logger="moe_offload"):
        pipe = LLMPipeline(tiny, "cpu", MOE_OFFLOAD_RATIO=50, MOE_HOST_CACHE=2 * row)  # one expert per layer
    pipe.close()
    host = next(c for c in pipe.choices if c.name == "MOE_HOST_CACHE")
    assert "2 of the 8 offloaded experts in the host tier, 6 on disk" in host.why
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "6 of the 8 offloaded experts do not fit the host tier" in warning[0].message


# -- the command line ------------------------------------------------------------------------------------------------

def test_info_shows_what_a_budget_gives(tiny, capsys):
    facts = _facts(tiny, CUDA)
    want = budget.fit(facts, 700 * MiB, 128, CUDA, "x")
    assert main(["info", tiny, "--device-memory", "700MiB", "--context", "128", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["ratio"] == want.ratio and plan["context"] == 128 and plan["device_memory"] == 700 * MiB
    assert plan["by_ratio"]["37"]["total"] == budget.plan(facts, 37, 128, CUDA).total
    assert main(["info", tiny, "--device-memory", "700MiB"]) == 0
    assert f"MOE_DEVICE_MEMORY gives MOE_OFFLOAD_RATIO={budget.fit(facts, 700 * MiB, 256, CUDA, 'x').ratio}" in \
        capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["info", "{tiny}", "--device-memory", "1MiB"], "cannot hold the model even at MOE_OFFLOAD_RATIO=0"),
    (["info", "{tiny}", "--device-memory", "1GiB", "--context", "100000"], "MOE_CONTEXT=100000 is more than"),
    (["generate", "-m", "{tiny}", "-lc", '{"MOE_DEVICE_MEMORY": "8GiB", "MOE_OFFLOAD_RATIO": 37}', "x"], "not both"),
])
def test_cli_budget_errors_are_one_line(tiny, capsys, argv, words):
    capsys.readouterr()
    assert main([a.replace("{tiny}", tiny) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moe-offload: error: ") and err.count("\n") == 1 and words in err


def test_a_generation_past_moe_context_is_refused(tiny):
    pipe = LLMPipeline(tiny, "cpu", MOE_CONTEXT=16)
    try:
        ids = torch.randint(2, 300, (1, 10))  # [1, T]
        assert pipe.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6).numel() == 6  # the whole context
        with pytest.raises(MoeOffloadError, match="10 prompt tokens \\+ max_new_tokens 7 exceed MOE_CONTEXT=16"):
            pipe.generate_tokens(ids, max_new_tokens=7)
    finally:
        pipe.close()


def test_meminfo_without_memavailable_falls_back_to_sysconf(tmp_path):
    """Kernels before 3.14 have no MemAvailable line: the host tier is then sized from sysconf's pages."""
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nCached:  30000000 kB\n")
    page = os.sysconf("SC_PAGE_SIZE")
    got = defaults.memory_info(str(path))
    assert got["total"] == os.sysconf("SC_PHYS_PAGES") * page and got["available"] > 0
