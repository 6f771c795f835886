"""Piecewise decode graphs (moe_offload/piecewise.py): the bookkeeping around the syncing MoE layers.

Without CUDA there is no capture: a stand-in graph records its calls and replays nothing, so the recording pass
runs the step eagerly (as it executes each segment on a GPU) and these tests check what is recorded, diverted,
restored and replayed. With CUDA, test_piecewise_decode_on_cuda runs the real thing against ratio 100.
"""

import pytest
import torch

from moe_offload import LLMPipeline
from moe_offload import piecewise
from moe_offload.cache import OffloadedExperts
from moe_offload.piecewise import PiecewiseStep

CUDA = torch.cuda.is_available()


class StandInGraph:
    """A torch CUDAGraph's interface, for CPU tests: counts calls, captures and replays nothing."""

    log: list[str] = []

    def capture_begin(self, **kwargs):
        self.log.append("begin")

    def capture_end(self):
        self.log.append("end")

    def replay(self):
        self.log.append("replay")


@pytest.fixture
def stand_in(monkeypatch):
    StandInGraph.log = []
    monkeypatch.setattr(PiecewiseStep, "graph_factory", StandInGraph)
    return StandInGraph.log


@pytest.fixture
def emulated_graphs(monkeypatch):
    """Graphs emulated on the CPU (tests/graph_emulation.py: captured ops really replay), with Triton launches and
    host functions recorded as graph nodes."""
    pytest.importorskip("triton")
    from graph_emulation import EmulatedGraph, record_graph_nodes

    monkeypatch.setattr(PiecewiseStep, "graph_factory", EmulatedGraph)
    record_graph_nodes(monkeypatch)


def _triton_pipeline(path, **properties):
    """A CPU pipeline whose MoE layers run the Triton kernels (in the interpreter)."""
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(path, "cpu", **properties)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
    return pipe


def _disk_pipeline(checkpoint_factory):
    """Every non-resident expert read from the checkpoint: each MoE layer syncs with the host."""
    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=25, MOE_HOST_CACHE=0)
    assert not any(layer.sync_free(layer.top_k) for layer in pipe.layers)
    return pipe


@torch.inference_mode()  # as the decoder runs
def test_recording_splits_at_every_syncing_layer(checkpoint_factory, stand_in):
    pipe = _disk_pipeline(checkpoint_factory)
    decoder = pipe.decoder
    prompt = torch.tensor([[3, 14, 15, 92]])
    eager = decoder.generate(prompt, 3, 3)  # the same tokens the recording pass must see
    decoder._ensure_cache(16)
    logits = decoder._prefill(prompt)
    decoder._token.copy_(decoder._pick(logits))
    decoder._position.fill_(prompt.shape[1])
    token, position = decoder._token.clone(), decoder._position.clone()
    step = decoder._record_piecewise()
    assert torch.equal(decoder._token, token) and torch.equal(decoder._position, position)  # restored
    layers = len(pipe.layers)
    assert len(step.segments) == layers + 1 and [c.runtime for c in step.calls] == pipe.layers
    assert stand_in == ["begin"] + ["end", "replay", "begin"] * layers + ["end", "replay"]
    assert int(decoder._pick(decoder._logits)) == eager[1]  # the recording pass ran the real step
    for call in step.calls:  # what each layer returned is kept for the next segment to read
        assert call.out.shape == call.hidden.shape and torch.isfinite(call.out).all()


@torch.inference_mode()  # as the decoder runs
def test_replay_runs_each_syncing_layer_between_segments(checkpoint_factory, stand_in):
    pipe = _disk_pipeline(checkpoint_factory)
    step = PiecewiseStep(torch.device("cpu"))
    hidden = torch.randn(1, pipe.layers[0].hidden)
    ids = torch.tensor([[0, 1]])
    weights = torch.tensor([[0.75, 0.25]])
    act = pipe.model.model.layers[0].mlp.experts.act_fn

    def fake_step():
        for layer in pipe.layers[:2]:
            piecewise.active().moe_call(layer, hidden, ids, weights, act)

    step.record(fake_step)
    stand_in.clear()
    hidden.mul_(2)  # a later step's input, at the address the segments write
    step.replay()
    assert stand_in == ["replay"] * 3
    for layer, call in zip(pipe.layers, step.calls):
        assert torch.equal(call.out, layer.forward(hidden, ids, weights, act))


def test_a_failed_recording_closes_its_capture_and_keeps_nothing(stand_in):
    step = PiecewiseStep(torch.device("cpu"))

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError):
        step.record(broken)
    assert stand_in == ["begin", "end"] and not step.segments and piecewise.active() is None


@torch.inference_mode()  # as the decoder runs
def test_sync_free_layers_stay_inside_the_segments(checkpoint_factory, stand_in):
    """Ratio 100 with the direct path: nothing syncs, so the step is a single segment."""
    pytest.importorskip("triton")
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=100)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device)
    decoder = pipe.decoder
    decoder._ensure_cache(16)
    decoder._token.fill_(5)
    decoder._position.fill_(0)
    step = decoder._record_piecewise()
    assert len(step.segments) == 1 and not step.calls


@torch.inference_mode()
def test_piecewise_replays_give_the_eager_tokens(checkpoint_factory, monkeypatch):
    """With graphs emulated on the CPU (tests/graph_emulation.py: the captured ops really replay), a decode whose
    steps are replayed piecewise around the disk-tier layers gives the eager decode's logits and tokens, over
    two generations (the second reuses the recorded step)."""
    from graph_emulation import EmulatedGraph

    monkeypatch.setattr(PiecewiseStep, "graph_factory", EmulatedGraph)
    path = checkpoint_factory("qwen3_moe")
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    eager = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_HOST_CACHE=0)
    want_logits = []
    want = eager.decoder.generate(prompt, 8, 8, on_logits=want_logits.append)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_HOST_CACHE=0)
    pipe.decoder.use_graph = True  # as on CUDA
    assert pipe.decoder._mode() == "piecewise"
    for _ in range(2):
        logits = []
        assert pipe.decoder.generate(prompt, 8, 8, on_logits=logits.append) == want
        assert all(torch.equal(a, b) for a, b in zip(logits, want_logits))
    assert isinstance(pipe.decoder.graph, PiecewiseStep) and pipe.decoder.steps_replayed >= 12
    assert len(pipe.decoder.graph.calls) == len(pipe.layers) and pipe.decoder.graph_failure is None


@torch.inference_mode()
@pytest.mark.parametrize("cpu_share", [False, True])
def test_piecewise_keeps_sync_free_layers_inside_the_segments(checkpoint_factory, emulated_graphs, cpu_share):
    """A model with one layer on the direct path (Triton, zero-copy: captured in a segment; with cpu_share, half
    its misses computed by the CPU's host function) and one on the copy path (eager between segments), as when
    the host tier holds only some layers' experts: replayed piecewise with graphs emulated on the CPU, the eager
    decode's logits (within 1e-5: CPU-computed experts sum in another order) and tokens."""
    from moe_offload.hybrid import CpuExperts

    path = checkpoint_factory("qwen3_moe")
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    runs = []
    for graphs in (False, True):
        pipe = _triton_pipeline(path, MOE_OFFLOAD_RATIO=25)
        assert pipe.layers[0].enable_direct(pipe.device) and not pipe.layers[1].direct
        if cpu_share:
            top_k = pipe.layers[0].top_k
            assert pipe.layers[0].enable_cpu_share([m // 2 for m in range(top_k + 1)], CpuExperts(threads=1))
        pipe.decoder.use_graph = graphs
        logits = []
        runs.append((pipe.decoder.generate(prompt, 6, 6, on_logits=logits.append), logits, pipe))
    (want, want_logits, _), (got, got_logits, pipe) = runs
    assert got == want and all((a - b).abs().max() <= 1e-5 for a, b in zip(got_logits, want_logits))
    if cpu_share:
        assert pipe.get_offload_stats()["experts_computed_on_cpu"] > 0
    step = pipe.decoder.graph
    assert [call.runtime for call in step.calls] == [pipe.layers[1]] and len(step.segments) == 2
    assert pipe.decoder.steps_replayed >= 4


@torch.inference_mode()
def test_layers_with_every_expert_cached_replay_their_own_graph(checkpoint_factory, monkeypatch,
                                                                 emulated_graphs):
    """Disk tier with the Triton kernel, steps replayed piecewise with graphs emulated on the CPU: a layer step
    whose experts are all cached replays its _HitsGraph (slot map from the host buffer, kernels, K-sum), the
    others run eagerly; both kinds occur, and logits and tokens are the eager decode's, bit for bit, over two
    generations."""
    path = checkpoint_factory("qwen3_moe")
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    runs = []
    for graphs in (False, True):
        pipe = _triton_pipeline(path, MOE_OFFLOAD_RATIO=50, MOE_HOST_CACHE=0)
        pipe.decoder.use_graph = graphs
        generations = []
        for generation in range(2):
            if graphs and generation == 1:  # the step is recorded: count how its layer steps run
                served = {"graph": 0, "eager": 0}
                hits_run, routed = piecewise._HitsGraph.run, OffloadedExperts.forward_routed
                monkeypatch.setattr(piecewise._HitsGraph, "run", lambda self, slots: (
                    served.__setitem__("graph", served["graph"] + 1), hits_run(self, slots)))
                monkeypatch.setattr(OffloadedExperts, "forward_routed", lambda self, *args: (
                    served.__setitem__("eager", served["eager"] + 1), routed(self, *args))[1])
            logits = []
            # 8 new tokens (12 before): the second generation's 7 steps still replay both kinds of layer step
            # (2 hits graphs and 14 eager layer steps on this checkpoint), which is what is counted below
            generations.append((pipe.decoder.generate(prompt, 8, 8, on_logits=logits.append), logits))
        runs.append((generations, pipe))
    (want, _), (got, pipe) = runs
    for (want_tokens, want_logits), (got_tokens, got_logits) in zip(want, got):
        assert got_tokens == want_tokens and all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert isinstance(pipe.decoder.graph, PiecewiseStep) and pipe.decoder.steps_replayed >= 12  # of 2 x 7 steps
    prefill_layers = len(pipe.layers)  # the second generation's prompt goes through forward_routed eagerly
    assert served["graph"] > 0 and served["eager"] > prefill_layers  # both kinds of layer step were replayed
    assert pipe.get_offload_stats()["piecewise_hits_graphs"] == {"layers": len(pipe.layers), "failure": None}


@torch.inference_mode()
def test_a_refused_hits_graph_leaves_the_layer_eager(checkpoint_factory, monkeypatch):
    """If a layer's hits graph cannot be captured, the failure is kept and that layer's steps run eagerly."""
    pytest.importorskip("triton")

    def refuse(self, call, graph_factory):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(piecewise._HitsGraph, "__init__", refuse)
    layer = _triton_pipeline(checkpoint_factory("qwen3_moe"), MOE_OFFLOAD_RATIO=100, MOE_HOST_CACHE=0).layers[0]
    hidden, ids = torch.randn(1, layer.hidden), torch.tensor([[1, 2]])
    weights = torch.tensor([[0.7, 0.3]])
    out = torch.empty(1, layer.hidden)
    call = piecewise._MoeCall(layer, hidden, ids, weights, torch.nn.functional.silu, out)
    for _ in range(2):
        call.run(StandInGraph)
        assert call.hits_graph is None and call.hits_graph_failure.startswith("operation not permitted")
        assert torch.equal(out, layer.forward(hidden, ids, weights, torch.nn.functional.silu))


@pytest.mark.parametrize("mode, ready", [("auto", True), ("off", False)])
def test_piecewise_is_part_of_auto(checkpoint_factory, mode, ready, monkeypatch):
    monkeypatch.setenv("MOE_CUDA_GRAPH", mode)
    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=25, MOE_HOST_CACHE=0)
    assert pipe._piecewise_ready() == ready
    assert pipe.decoder._mode() is None  # no CUDA graphs on a CPU device


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ratio", [25, 0])
def test_piecewise_decode_on_cuda(ratio):
    """The shipped model with every miss read from disk, steps replayed piecewise: ratio 100's tokens."""
    prompt = torch.randint(2, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    reference = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48)
    reference.close()
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=0)
    got = pipe.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48)
    stats = pipe.get_offload_stats()
    assert stats["cuda_graph_failure"] is None and stats["cuda_graph_steps"] > 0
    assert stats["piecewise_hits_graphs"] is not None and stats["piecewise_hits_graphs"]["failure"] is None
    print(f"ratio {ratio}: hits graphs {stats['piecewise_hits_graphs']}")
    assert torch.equal(got, want)
    again = pipe.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48)  # the recorded step reused
    assert torch.equal(again, want)
