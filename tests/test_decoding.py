"""The static-cache greedy decoder (decoding.py) against transformers' generate on the same offloaded model.

On the CPU the loop runs eagerly (CUDA graphs need CUDA; tests/test_cuda_stress.py replays them on a GPU): what
is checked here is everything the graph would replay, i.e. the static cache, positions, the 4-D mask, the EOS
bias for min_new_tokens and the stopping rule. Tolerance as in test_correctness: 1e-4 on float32 logits.
"""

import os

import pytest
import torch
from tiny_models import VOCAB, tiny_config

from moe_offload import LLMPipeline
from moe_offload.decoding import unsupported_reason
from moe_offload.errors import MoeOffloadError

ATOL = 1e-4


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def pipe(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(request.param), dtype=torch.float32).save_pretrained(path)
    return LLMPipeline(str(path), "cpu", MOE_OFFLOAD_RATIO=37)


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))  # [1, T]


def _transformers(pipe, ids, **kwargs):
    with torch.no_grad():
        run = pipe.model.generate(ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    return run.sequences[0, ids.shape[1]:], torch.stack(run.logits)[:, 0]  # [N], [N, V]


def test_logits_and_tokens_match_generate(pipe):
    ids = _ids(11)
    expected_tokens, expected_logits = _transformers(pipe, ids, max_new_tokens=12, min_new_tokens=12)
    logits = []
    tokens = pipe.decoder.generate(ids, 12, 12, on_logits=logits.append)
    assert tokens == expected_tokens.tolist()
    diff = (torch.cat(logits) - expected_logits).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| {diff:.2e}"


def test_cache_is_reset_and_regrown_between_generations(pipe):
    """Reusing the cache for a shorter request and growing it past its bucket give fresh-cache results."""
    short, long = _ids(7, seed=1), _ids(300, seed=2)  # 300 + 4 > one 256-position bucket
    first = pipe.decoder.generate(short, 5, 5)
    assert pipe.decoder.generate(_ids(20, seed=3), 5, 5) == _transformers(
        pipe, _ids(20, seed=3), max_new_tokens=5, min_new_tokens=5)[0].tolist()
    assert pipe.decoder.generate(long, 4, 4) == _transformers(pipe, long, max_new_tokens=4,
                                                              min_new_tokens=4)[0].tolist()
    assert pipe.decoder.max_len == 512
    assert pipe.decoder.generate(short, 5, 5) == first


def test_eos_stops_only_after_min_new_tokens(pipe, monkeypatch):
    """EOS is masked while fewer than min_new_tokens are out (as MinNewTokensLogitsProcessor does), then stops."""
    ids = _ids(9, seed=4)
    first = pipe.decoder.generate(ids, 1)[0]
    monkeypatch.setattr(pipe.decoder, "eos_ids", [first])  # the token greedy picks first is now EOS
    assert pipe.decoder.generate(ids, 8) == [first]
    expected, _ = _transformers(pipe, ids, max_new_tokens=8, min_new_tokens=4, eos_token_id=first)
    got = pipe.decoder.generate(ids, 8, 4)
    assert got == expected.tolist() and first not in got[:4] and len(got) >= 4


def test_streamer_gets_prompt_then_each_token(pipe):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    ids, recorder = _ids(6, seed=5), Recorder()
    tokens = pipe.generate_tokens(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=recorder)
    assert recorder.puts == [ids.tolist()] + [[t] for t in tokens.tolist()] and recorder.ended


def _forward_logits(pipe, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own forward over `ids` [1, T]: logits [T, V] at every position."""
    with torch.no_grad():
        return pipe.model(input_ids=ids).logits[0].float()


def test_fed_tokens_are_decoded_in_place_of_the_greedy_picks(pipe):
    """With a feed the new tokens are the fed ones, and each step's logits are transformers' forward over the
    prompt and the tokens fed so far (so the cache holds the fed tokens, not the picks)."""
    ids, feed = _ids(9, seed=7), _ids(8, seed=8)[0]
    logits = []
    assert pipe.decoder.generate(ids, 6, 6, on_logits=logits.append, feed=feed) == feed[:6].tolist()
    want = _forward_logits(pipe, torch.cat([ids[0], feed[:5]])[None])[ids.shape[1] - 1:]  # [6, V]
    diff = (torch.cat(logits) - want).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| {diff:.2e}"
    assert pipe.generate_tokens(ids, max_new_tokens=5, min_new_tokens=5, feed=feed).tolist() == feed[:5].tolist()
    greedy = pipe.decoder.generate(ids, 6, 6)
    assert greedy == _transformers(pipe, ids, max_new_tokens=6, min_new_tokens=6)[0].tolist()  # feed not kept
    with pytest.raises(ValueError, match="at least 6 tokens"):
        pipe.decoder.generate(ids, 6, 6, feed=feed[:5])
    with pytest.raises(MoeOffloadError, match="feeding given tokens needs greedy decoding"):
        pipe.generate_tokens(ids, max_new_tokens=4, do_sample=True, feed=feed)


def test_unsupported_requests_go_to_transformers(pipe):
    assert unsupported_reason(pipe.model, dict(max_new_tokens=4, do_sample=False)) is None
    assert unsupported_reason(pipe.model, dict(max_new_tokens=4, do_sample=True)) == "sampling"
    assert "num_beams" in unsupported_reason(pipe.model, dict(max_new_tokens=4, num_beams=2))
    saved = pipe.model.generation_config.repetition_penalty
    pipe.model.generation_config.repetition_penalty = 1.3
    try:
        assert "repetition_penalty" in unsupported_reason(pipe.model, dict(max_new_tokens=4))
        ids = _ids(8, seed=6)  # and the pipeline then gives transformers' answer, penalty included
        expected, _ = _transformers(pipe, ids, max_new_tokens=6, min_new_tokens=6)
        assert pipe.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False).tolist() == \
            expected.tolist()
    finally:
        pipe.model.generation_config.repetition_penalty = saved


@torch.inference_mode()
@pytest.mark.parametrize("variant", ["zero-copy", "hybrid", "hybrid-lru", "hybrid-numba", "host-embeddings",
                                     "fused-dense", "fed"])
def test_graph_replays_give_the_eager_tokens(checkpoint_factory, monkeypatch, variant):
    """The decode step and a recurring prompt's prefill replayed from (CPU-emulated) whole graphs, on the paths
    that make a step capturable: zero-copy misses, misses partly on the CPU (host functions; on bf16 experts
    the numba kernel's compiled step), with device LRU, the embedding table read from the host, fused dense ops
    (Triton kernels as graph nodes); and with fed tokens (each written over the replayed step's pick). Two
    generations of the same prompt: the eager decode's logits and tokens, and something was replayed."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # a CUDA machine: the graphs are real there (test_cuda_stress.py)
        pytest.skip("CPU-emulated graphs need Triton's interpreter for kernels on CPU tensors")
    from graph_emulation import emulate_whole_graphs, record_graph_nodes

    from moe_offload.hybrid import CpuExperts
    from moe_offload.dense_fusion import fuse_dense_ops, unfuse_dense_ops
    from moe_offload.host_embeddings import move_input_embeddings_to_host
    from moe_offload.kernels.triton_moe import fused_moe

    record_graph_nodes(monkeypatch)
    path = checkpoint_factory("qwen3_moe")
    # Three prompt tokens: still a many-token prefill (6 pairs, the decode kernels' path as 5 tokens took), with
    # fewer interpreted programs than the 5 it was; the decode steps are what the variants differ in.
    prompt = torch.tensor([[3, 14, 15]])
    runs = []
    for graphs in (False, True):
        numba = variant == "hybrid-numba"
        if numba:
            pytest.importorskip("numba")
        pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37, MOE_DTYPE="bfloat16" if numba else "auto")
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            assert layer.enable_direct(pipe.device, lru=variant == "hybrid-lru")
            if variant.startswith("hybrid"):
                runner = CpuExperts(threads=1, compute="numba" if numba else "native")
                assert layer.enable_cpu_share([m // 2 for m in range(layer.top_k + 1)], runner)
        if variant == "host-embeddings":
            assert move_input_embeddings_to_host(pipe.model, force=True) > 0
        if variant == "fused-dense":
            assert fuse_dense_ops(pipe.model, force=True)
        decoder = pipe.decoder
        decoder.use_graph = graphs
        if graphs:
            emulate_whole_graphs(monkeypatch, decoder)
        outputs = []
        for _ in range(2):
            logits = []
            feed = torch.tensor([7, 3, 7, 11, 2]) if variant == "fed" else None
            outputs.append((decoder.generate(prompt, 5, 5, on_logits=logits.append, feed=feed), logits))
        runs.append(outputs)
        if variant == "fused-dense":
            unfuse_dense_ops(pipe.model)  # the rotary patch is process-wide
    for (want, want_logits), (got, got_logits) in zip(*runs):
        assert got == want and all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
        assert variant != "fed" or got == [7, 3, 7, 11, 2]
    assert decoder.steps_replayed >= 4 and decoder.prefills_replayed == 1 and decoder.graph_failure is None
    if numba:
        from moe_offload.hybrid.driver import NativeHostFunction

        assert isinstance(pipe.layers[0].cpu_share._native, NativeHostFunction)
        assert pipe.get_offload_stats()["experts_computed_on_cpu"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fed_tokens_through_queued_graph_replays_on_cuda():
    """The shipped model at ratio 0 (zero-copy, whole-step graphs), steps queued one ahead of the host
    (_replay_rest) with fed tokens: the new tokens are the fed ones, and the last step's logits equal those of the
    same feed decoded step by step with its logits read back (so each queued step decoded its fed token)."""
    generator = torch.Generator().manual_seed(9)
    prompt = torch.randint(2, 1000, (1, 16), generator=generator).cuda()
    feed = torch.randint(2, 1000, (24,), generator=generator)
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=0, MOE_CPU_EXPERTS="off")
    logits = []
    assert pipe.decoder.generate(prompt, 24, 24, on_logits=logits.append, feed=feed) == feed.tolist()
    replayed = pipe.decoder.steps_replayed
    assert pipe.generate_tokens(prompt, max_new_tokens=24, min_new_tokens=24, feed=feed).tolist() == feed.tolist()
    assert pipe.decoder.steps_replayed >= replayed + 20
    assert torch.equal(pipe.decoder._logits.float(), logits[-1])
