"""bench/routing_replay.py: a pipeline's MoE layers routed by a trained model's recorded routing (the harness's
"trace" workload): the committed traces parse into per-layer streams, rows are fitted to a layer's shape with
distinct experts, and every forward of the engine takes the next rows of its layer's stream."""

import torch

from bench.routing_replay import RoutingReplay, fit_rows, learned_stream
from moe_offload import LLMPipeline


def test_learned_stream_reads_the_committed_traces():
    stream = learned_stream()
    assert len(stream) == 8 and all(rows.shape == stream[0].shape for rows in stream)
    rows = stream[0]
    assert rows.shape[1] == 8 and rows.shape[0] > 1000 and 0 <= int(rows.min()) and int(rows.max()) < 128
    assert all(len(set(row)) == 8 for row in rows[:200].tolist())  # a router's distinct top-8


def test_fit_rows_keeps_order_and_distinct_ids():
    rows = torch.tensor([[17, 1, 33, 5], [3, 2, 1, 0]])
    assert torch.equal(fit_rows(rows, 40, 4), rows)  # the trained shape: unchanged
    fitted = fit_rows(rows, 16, 3)  # 17 % 16 = 1 and 33 % 16 = 1 collide with 1
    assert fitted.tolist() == [[1, 5, 0], [3, 2, 1]]


def test_pipeline_takes_the_next_rows_of_its_layers_stream(checkpoint_factory):
    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=50)
    num_experts, top_k = pipe.layers[0].num_experts, pipe.layers[0].top_k
    gen = torch.Generator().manual_seed(0)
    stream = [torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(40)]) for _ in range(3)]
    replay = RoutingReplay(pipe, stream, seed=0)
    seen = {layer.layer: [] for layer in pipe.layers}
    for layer in pipe.layers:
        layer.route_observer = lambda index, top_k_index: seen[index].extend(top_k_index.tolist())
    replay.reset(10)
    start = replay.layers[0].counter.item()
    ids = torch.randint(2, 100, (1, 5), generator=gen)  # [1, T]
    pipe.generate_tokens(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for layer in pipe.layers:
        rows = stream[layer.layer % 3]
        want = [rows[(start + i) % 40].tolist() for i in range(len(seen[layer.layer]))]
        assert len(seen[layer.layer]) == 5 + 4 and seen[layer.layer] == want  # 5 prompt tokens, 4 decode steps
    assert pipe.get_offload_stats()["hits"] + pipe.get_offload_stats()["misses"] > 0
