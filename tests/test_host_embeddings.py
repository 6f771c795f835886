"""The input embedding table in host RAM (moe_offload/host_embeddings.py), gathered by a Triton kernel.

Without CUDA the kernel runs in Triton's interpreter and the "host" table is where it always was; the gather, the
module swap and what is refused are the same code. With CUDA: the shipped-size pipeline keeps its tokens and
gives back the table's device memory.
"""

import pytest
import torch

from triton_interp import CUDA  # first: sets TRITON_INTERPRET before triton loads

from moe_offload import LLMPipeline
from moe_offload.host_embeddings import hostable_input_embedding, move_input_embeddings_to_host
from moe_offload.kernels import triton_dense

DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,width", [((1, 1), 64), ((2, 7), 96), ((5,), 2100)])  # 2100: two column blocks
def test_gather_equals_embedding(dtype, shape, width):
    table = torch.randn(50, width).to(dtype)
    ids = torch.randint(0, 50, shape)
    got = triton_dense.embedding(ids.to(DEVICE), table.to(DEVICE))
    assert torch.equal(got.cpu(), torch.nn.functional.embedding(ids, table))


@pytest.mark.skipif(CUDA, reason="Triton on CPU tensors runs only in the interpreter, used where there is no GPU; "
                                  "test_host_embeddings_on_cuda covers CUDA")
@torch.inference_mode()
def test_pipeline_logits_unchanged_and_table_moved(checkpoint_factory):
    path = checkpoint_factory("qwen3_moe")
    ids = torch.tensor([[5, 17, 42, 9]])
    plain = LLMPipeline(path, "cpu")
    want = plain.model(ids).logits
    tokens = plain.generate_tokens(ids, max_new_tokens=5, min_new_tokens=5)
    pipe = LLMPipeline(path, "cpu")
    embedding = pipe.model.get_input_embeddings()
    vocab, hidden = embedding.weight.shape
    assert move_input_embeddings_to_host(pipe.model) == 0  # a CPU model: only when forced
    assert move_input_embeddings_to_host(pipe.model, force=True) == vocab * hidden * 4
    assert embedding.weight.shape == (0, hidden) and embedding.host_table.shape == (vocab, hidden)
    assert pipe.model.device.type == "cpu" and pipe.model.dtype == torch.float32
    assert torch.equal(pipe.model(ids).logits, want)
    assert torch.equal(pipe.generate_tokens(ids, max_new_tokens=5, min_new_tokens=5), tokens)
    assert move_input_embeddings_to_host(pipe.model, force=True) == 0  # already moved: nothing changes
    assert embedding.host_table.shape == (vocab, hidden) and torch.equal(pipe.model(ids).logits, want)


def test_tied_tables_stay(checkpoint_factory):
    """A tied lm_head reads the whole table each token: the table must stay on the device."""
    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu")
    model = pipe.model
    model.lm_head.weight = model.get_input_embeddings().weight  # tie them
    assert move_input_embeddings_to_host(model, force=True) == 0


def test_load_allocates_the_table_apart(checkpoint_factory):
    """At load (integration._materialise_dense, on CUDA) the table is set aside while the model is allocated on
    the device, and only then allocated in host RAM: here, on a meta model, allocating the rest leaves it
    untouched. Tied tables are not set aside, by config or by sharing the output layer's weight."""
    from transformers import AutoConfig

    from moe_offload.integration import _build_meta_model, _set_aside

    config = AutoConfig.from_pretrained(checkpoint_factory("qwen3_moe"))
    model = _build_meta_model(config, torch.float32)
    embedding = hostable_input_embedding(model)
    assert embedding is model.get_input_embeddings()
    with _set_aside(model, embedding):
        assert model.get_input_embeddings() is None
        model.to_empty(device="cpu")
    assert model.get_input_embeddings() is embedding and embedding.weight.device.type == "meta"
    assert model.lm_head.weight.device.type == "cpu"
    config.tie_word_embeddings = True
    assert hostable_input_embedding(_build_meta_model(config, torch.float32)) is None


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_host_embeddings_on_cuda(checkpoint_factory):
    """An untied model at ratio 0 (zero-copy, decode graphs) gives ratio 100's tokens with the table in host RAM,
    and the device holds the table's bytes less."""
    path = checkpoint_factory("qwen3_moe")
    prompt = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    reference = LLMPipeline(path, "cuda", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(prompt, max_new_tokens=16, min_new_tokens=16)
    reference.close()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plain = LLMPipeline(path, "cuda", MOE_OFFLOAD_RATIO=0, MOE_HOST_EMBEDDINGS="off", MOE_CPU_EXPERTS="off")
    plain_bytes = torch.cuda.memory_allocated() - before
    plain_peak = torch.cuda.max_memory_allocated() - before  # loading included
    plain.close()
    del plain
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pipe = LLMPipeline(path, "cuda", MOE_OFFLOAD_RATIO=0, MOE_HOST_EMBEDDINGS="on", MOE_CPU_EXPERTS="off")
    moved = pipe.get_offload_stats()["host_embedding_bytes"]
    assert moved > 0 and torch.cuda.memory_allocated() - before <= plain_bytes - moved
    assert torch.cuda.max_memory_allocated() - before <= plain_peak - moved  # not on the device even while loading
    assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=16, min_new_tokens=16), want)
    assert pipe.get_offload_stats()["cuda_graph_steps"] > 0
