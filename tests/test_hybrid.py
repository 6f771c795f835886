"""Hybrid decode (moe_offload/hybrid/): some misses computed on the CPU while the GPU reads the rest in place.

On the CPU the Triton kernels run in the interpreter and the host function runs inline; the split, the
mailbox, the CPU experts and the merge of their rows are the same code as on CUDA. Tolerance: float32 logits
within 1e-5 of the all-GPU-path run (CPU experts accumulate in another order), greedy tokens identical.
With CUDA: the real host function inside the decode graph, on the shipped model, against ratio 100.
"""

import gc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from triton_interp import CUDA  # first: sets TRITON_INTERPRET before triton loads

from moe_offload import LLMPipeline, hybrid
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat
from moe_offload.hybrid import CpuExperts, CpuShare
from moe_offload.hybrid.driver import HostFunction
from moe_offload.hybrid.tuning import _TokenStamps, all_on_cpu, check_on_decode, tune_cpu_path, tune_split
from moe_offload.kernels.reference import weighted_expert_output
from moe_offload.tiers import HostTier
from slot_checks import misplaced

ATOL = 1e-5


def _tier(num_experts=6, inter=16, hidden=32, seed=0) -> HostTier:
    torch.manual_seed(seed)
    tier = HostTier(list(range(num_experts)), ExpertFormat(inter, hidden, torch.float32), pin=False)
    tier.gate_up.copy_(torch.randn_like(tier.gate_up) * 0.2)
    tier.down.copy_(torch.randn_like(tier.down) * 0.2)
    return tier


@pytest.mark.parametrize("from_host,split,expected_cpu", [
    ([1, 1, 1, 1], [0, 1, 1, 2, 3], [1, 1, 1, 0]),  # 4 misses -> the first 3 on the CPU
    ([0, 1, 0, 1], [0, 1, 1, 2, 3], [0, 1, 0, 0]),  # 2 misses -> the first one
    ([0, 0, 0, 0], [0, 1, 1, 2, 3], [0, 0, 0, 0]),  # all hits: nothing on the CPU
    ([1, 0, 1, 1], all_on_cpu(4), [1, 0, 1, 1]),
    ([1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_split_sends_the_first_misses_to_the_cpu(from_host, split, expected_cpu):
    tier = _tier()
    hidden_size, top_k = tier.gate_up.shape[2], len(from_host)
    share = CpuShare(tier, 6, top_k, hidden_size, split, CpuExperts(threads=1), torch.device("cpu"))
    hidden = torch.randn(1, hidden_size)  # [1, H]
    ids = torch.tensor([[4, 0, 5, 2]])  # [1, K]
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    seen = {}

    def gpu_share(gpu_ids):
        seen["ids"] = gpu_ids.clone()
        return torch.full((top_k, hidden_size), 7.0)  # [K, H] stands for the GPU's rows

    contrib = share.forward(hidden, ids, weights, torch.tensor([from_host]), gpu_share, torch.nn.functional.silu)
    for k, on_cpu in enumerate(expected_cpu):
        expert = int(ids[0, k])
        if on_cpu:
            assert int(seen["ids"][0, k]) == 6  # E: the GPU kernels skip it
            gate_up, down = tier.get(expert)
            want = weighted_expert_output(hidden, weights[0, k:k + 1], gate_up, down, torch.nn.functional.silu)
            assert torch.allclose(contrib[k], want[0].float(), atol=ATOL)
        else:
            assert int(seen["ids"][0, k]) == expert and torch.equal(contrib[k], torch.full((hidden_size,), 7.0))
    assert int(share.tally) == sum(expected_cpu)


def test_the_cpu_takes_the_misses_used_least_recently():
    """With the split giving the CPU one of two misses: at first (nothing used yet) the first miss in top-k order;
    once an expert has been used, the other miss (the one not seen for longest), whatever its routing weight."""
    tier = _tier()
    hidden_size = tier.gate_up.shape[2]
    share = CpuShare(tier, 6, 2, hidden_size, [0, 1, 1], CpuExperts(threads=1), torch.device("cpu"))
    hidden, weights = torch.randn(1, hidden_size), torch.tensor([[0.6, 0.4]])  # [1, H], [1, K]
    misses = torch.ones(1, 2, dtype=torch.long)  # [1, K] both pairs read from the host tier
    taken = []

    def step(ids):
        seen = {}

        def gpu_share(gpu_ids):
            seen["ids"] = gpu_ids.clone()
            return torch.zeros(2, hidden_size)

        share.forward(hidden, torch.tensor([ids]), weights, misses, gpu_share, torch.nn.functional.silu)
        taken.append([e for e, g in zip(ids, seen["ids"][0].tolist()) if g == 6])  # E: the CPU's

    step([4, 0])  # never used: ties, top-k order -> 4
    step([0, 5])  # 0 used at step 1, 5 never -> 5
    step([4, 5])  # 4 used at step 1, 5 at step 2 -> 4
    step([5, 0])  # 5 at step 3, 0 at step 2 -> 0
    assert taken == [[4], [5], [4], [0]]


@pytest.mark.parametrize("top_k,hidden_size,dtype,first_step", [(8, 1500, torch.bfloat16, 11),
                                                                (6, 64, torch.float32, 0),
                                                                (2, 2048, torch.float16, 11)])
def test_fused_pack_gives_the_torch_packs_values(top_k, hidden_size, dtype, first_step):
    """kernels/triton_hybrid.pack_share (Triton's interpreter here, compiled on CUDA) against pack_share_torch, bit
    for bit, over 12 steps in a row (so the last-use stamps that pick the CPU's misses vary) and splits: packed
    mailbox, GPU ids, CPU pairs, tally, last-use stamps and the step (the doorbell's ring value)."""
    triton_hybrid = pytest.importorskip("moe_offload.hybrid.kernels.triton_hybrid")
    from moe_offload.hybrid.share import pack_share_torch

    device = torch.device("cuda" if CUDA else "cpu")
    if not triton_hybrid.runs_on(torch.empty(0, device=device)):
        pytest.skip("Triton does not run on this device here (TRITON_INTERPRET unset)")
    generator = torch.Generator().manual_seed(top_k)
    num_experts = 40
    host_rows = torch.where(torch.rand(num_experts, generator=generator) < 0.5,
                            torch.randperm(num_experts, generator=generator), -1).to(device)  # [E]
    stamps = {pack: (torch.zeros(num_experts, dtype=torch.int32, device=device),
                     torch.full((1,), first_step, dtype=torch.int32, device=device))
              for pack in (pack_share_torch, triton_hybrid.pack_share)}
    for case in range(12):
        ids = torch.randperm(num_experts // 2, generator=generator)[:top_k].view(1, top_k).to(device)  # [1, K]
        from_host = (host_rows[ids] >= 0).long()  # [1, K]
        split = torch.tensor([min(m, (m * case) // 7) for m in range(top_k + 1)], device=device)  # [K + 1]
        hidden = torch.randn(1, hidden_size, generator=generator).to(device, dtype)  # [1, H]
        weights = torch.rand(1, top_k, generator=generator).to(device)  # [1, K]
        outputs = []
        for pack in (pack_share_torch, triton_hybrid.pack_share):
            out = (torch.full((hidden_size + 2 * top_k,), 9.0, device=device),
                   torch.full((1, top_k), -5, dtype=torch.long, device=device),
                   torch.full((top_k,), 7, dtype=torch.uint8, device=device), torch.tensor(3, device=device))
            pack(hidden, ids, weights, from_host, split, host_rows, num_experts, *out, *stamps[pack])
            outputs.append(out + stamps[pack])
        for want, got in zip(*outputs):
            assert torch.equal(want, got)
        assert int(outputs[0][2].sum()) == int(outputs[0][3]) - 3  # the tally counts the CPU's pairs
        step = outputs[0][5]
        assert int(step) == first_step + case + 1 and torch.equal(outputs[0][4][ids[0]], step.expand(top_k))


def test_cpu_share_with_the_numba_kernel_on_bf16():
    """The engine's CPU kernel for bf16 SiLU experts (tuning.cpu_expert_kernels): rows within 4 bf16 ulps of
    the reference's."""
    pytest.importorskip("numba")
    from moe_offload.hybrid.kernels import cpu_numba
    from moe_offload.hybrid.tuning import cpu_expert_kernels

    assert cpu_expert_kernels(torch.bfloat16, torch.nn.functional.silu) == ["numba", "native"]
    assert cpu_expert_kernels(torch.float32, torch.nn.functional.silu) == ["native"]
    assert cpu_expert_kernels(torch.bfloat16, torch.nn.functional.gelu) == ["native"]
    torch.manual_seed(0)
    tier = HostTier(list(range(6)), ExpertFormat(64, 128, torch.bfloat16), pin=False)
    tier.gate_up.copy_(torch.randn_like(tier.gate_up, dtype=torch.float32) * 0.1)
    tier.down.copy_(torch.randn_like(tier.down, dtype=torch.float32) * 0.1)
    share = CpuShare(tier, 6, 4, 128, all_on_cpu(4), CpuExperts(threads=2, compute="numba"), torch.device("cpu"))
    kernel = cpu_numba._functions()[0]
    compiled = list(kernel.signatures)  # by the runner's constructor, not by a first step
    hidden = torch.randn(1, 128).to(torch.bfloat16)
    ids, weights = torch.tensor([[3, 1, 4, 0]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]).to(torch.bfloat16)
    contrib = share.forward(hidden, ids, weights, torch.ones(1, 4, dtype=torch.long),
                            lambda gpu_ids: torch.zeros(4, 128), torch.nn.functional.silu)
    assert compiled and kernel.signatures == compiled  # the step compiled nothing more
    for k in range(4):
        gate_up, down = tier.get(int(ids[0, k]))
        want = weighted_expert_output(hidden, weights[0, k:k + 1], gate_up, down, torch.nn.functional.silu)[0]
        assert (contrib[k] - want.float()).abs().max() <= 2.0 ** -6 * want.float().abs().max()


def test_compiled_step_gives_the_python_steps_bits():
    """The numba kernel's compiled host step (no GIL; kernels/cpu_numba.step_function) computes the same rows as
    the Python host function running the same kernel, also run on a thread Python never saw (pthread_create),
    as CUDA's driver thread is."""
    pytest.importorskip("numba")
    import ctypes

    from moe_offload.hybrid.driver import NativeHostFunction
    from moe_offload.hybrid.kernels import cpu_numba

    torch.manual_seed(0)
    tier = HostTier(list(range(6)), ExpertFormat(64, 128, torch.bfloat16), pin=False)
    tier.gate_up.copy_(torch.randn_like(tier.gate_up, dtype=torch.float32) * 0.1)
    tier.down.copy_(torch.randn_like(tier.down, dtype=torch.float32) * 0.1)
    hidden = torch.randn(1, 128).to(torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 0]])
    from_host = torch.tensor([[1, 0, 1, 1]])  # three misses, the first two on the CPU (split [.., 2])
    runs, last_compiled = {}, None
    for weight_dtype in (torch.bfloat16, torch.float32):  # bf16 weights round their products, float32 do not
        weights = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).to(weight_dtype)
        for compiled in (True, False):
            share = CpuShare(tier, 6, 4, 128, [0, 1, 2, 2, 2], CpuExperts(threads=2, compute="numba"),
                             torch.device("cpu"))
            if not compiled:
                share._host_function = lambda act_fn, share=share: share._function
            contrib = share.forward(hidden, ids, weights, from_host, lambda gpu_ids: torch.zeros(4, 128),
                                    torch.nn.functional.silu)
            assert isinstance(share._host_function(torch.nn.functional.silu), NativeHostFunction) == compiled
            runs[weight_dtype, compiled] = contrib
            last_compiled = share if compiled else last_compiled
        assert torch.equal(runs[weight_dtype, True], runs[weight_dtype, False])
        assert runs[weight_dtype, True][[0, 2]].abs().sum() > 0 and not runs[weight_dtype, True][[1, 3]].any()
    share = last_compiled  # float32 weights; its mailbox still holds that step
    share._out_host.zero_()
    assert isinstance(share._host_function(torch.nn.functional.silu), NativeHostFunction)
    libc = ctypes.CDLL(None)
    thread = ctypes.c_ulong()
    # the step as a thread's start routine (its void result is ignored): run, then joined
    assert libc.pthread_create(ctypes.byref(thread), None, ctypes.c_void_p(cpu_numba.step_function()),
                               ctypes.c_void_p(share._descriptor.ctypes.data)) == 0
    assert libc.pthread_join(thread, None) == 0
    assert torch.equal(share._out_host[[0, 2]], runs[torch.float32, True][[0, 2]])


def test_doorbell_server_runs_the_compiled_step_when_rung():
    """kernels/doorbell.py, with this test in the GPU's place: a new RING value gets the step's rows computed into
    the output buffer and DONE set; an unchanged RING gets nothing; DONE cleared and RING moved on: the next step."""
    pytest.importorskip("numba")
    import time

    from moe_offload.hybrid.kernels import doorbell

    torch.manual_seed(0)
    tier = HostTier(list(range(6)), ExpertFormat(64, 128, torch.bfloat16), pin=False)
    tier.gate_up.copy_(torch.randn_like(tier.gate_up, dtype=torch.float32) * 0.1)
    tier.down.copy_(torch.randn_like(tier.down, dtype=torch.float32) * 0.1)
    ids, weights = torch.tensor([[3, 1, 4, 0]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]).to(torch.bfloat16)
    from_host = torch.tensor([[1, 0, 1, 1]])  # the first two misses on the CPU (split [.., 2])
    share = CpuShare(tier, 6, 4, 128, [0, 1, 2, 2, 2], CpuExperts(threads=2, compute="numba"), torch.device("cpu"))
    wants = []
    for seed in (1, 2):  # on the CPU device forward runs the compiled step at once: the reference rows
        hidden = torch.randn(1, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        wants.append((hidden, share.forward(hidden, ids, weights, from_host, lambda gpu_ids: torch.zeros(4, 128),
                                            torch.nn.functional.silu)[[0, 2]].clone()))
    bell = np.zeros(doorbell.DOORBELL_WORDS, dtype=np.int32)
    registration = doorbell.server().register(bell, share._descriptor)

    def wait_done() -> None:
        deadline = time.monotonic() + 10
        while bell[doorbell.DONE] != 1:
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.001)

    try:
        for step, (hidden, want) in enumerate(wants, start=1):
            share._mailbox[:128] = hidden.float()[0]  # what the GPU's mailbox copy puts there (rows, weights stay)
            share._out_host.zero_()
            time.sleep(0.05)
            assert not share._out_host.any()  # RING unchanged: nothing served
            bell[doorbell.RING] = step  # the GPU's RING copy
            wait_done()
            assert torch.equal(share._out_host[[0, 2]], want) and not share._out_host[[1, 3]].any()
            bell[doorbell.DONE] = 0  # the GPU's write after its wait
    finally:
        doorbell.server().unregister(registration)
    bell[doorbell.RING] = 3  # unregistered: no longer served
    time.sleep(0.05)
    assert bell[doorbell.DONE] == 0


def test_handoff_reports_the_host_function_and_why_stream_wait_was_not_used():
    share = CpuShare(_tier(), 6, 2, 32, [0, 1, 2], CpuExperts(threads=1), torch.device("cpu"))
    assert share.handoff == "host_function"
    with pytest.raises(MoeOffloadError, match="needs CUDA"):
        share.use_stream_wait()
    share.stream_wait_refused = "no cuStreamWaitValue32_v2"
    assert share.handoff == "host_function (stream_wait refused: no cuStreamWaitValue32_v2)"


def test_bad_split_table_is_refused_and_zeros_turn_the_path_off():
    with pytest.raises(MoeOffloadError, match="split table"):
        CpuShare(_tier(), 6, 2, 32, [0, 2, 1], CpuExperts(threads=1), torch.device("cpu"))
    share = CpuShare(_tier(), 6, 2, 32, [0, 0, 0], CpuExperts(threads=1), torch.device("cpu"))
    assert not share.active  # the layer then skips the CPU path's copies and host function
    share.set_split(2, 1)
    assert share.active and share.split.tolist() == [0, 0, 1]
    with pytest.raises(MoeOffloadError, match="cannot compute 2 of 1"):
        share.set_split(1, 2)


def test_host_function_error_is_kept_for_check():
    def fail():
        raise ValueError("boom")

    function = HostFunction(fail)
    function._trampoline(None)  # what the driver's thread calls: must not raise there
    with pytest.raises(MoeOffloadError, match="boom"):
        function.check()
    function.check()  # reported once

    collecting = []
    HostFunction(lambda: collecting.append(gc.isenabled()))._trampoline(None)
    assert collecting == [False] and gc.isenabled()  # no collection on the driver's thread, back on after


def _direct_pipeline(path, ratio, table=None, lru=False):
    """A CPU pipeline whose layers run the direct path (Triton interpreter; with LRU admission if `lru`), with a
    CPU share if `table`."""
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=ratio)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device, lru=lru) and layer.lru_admission == lru
        if table is not None:
            assert layer.enable_cpu_share(table(layer.top_k), CpuExperts(threads=1))
    return pipe


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines")
@pytest.mark.parametrize("threads", [None, 2])
def test_cpu_threads_property_sizes_the_cpu_share(tmp_path, monkeypatch, threads):
    """MOE_CPU_EXPERTS=all on zero-copy layers (the Triton kernel, interpreted): every layer's CPU share runs on
    MOE_CPU_THREADS workers (auto: the cores torch uses less two), the stats say how many, and decode still gives
    ratio 100's tokens."""
    from moe_offload import integration
    from moe_offload.kernels.triton_moe import fused_moe

    path = _tiny_checkpoint(tmp_path)
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    want = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100).generate_tokens(ids, max_new_tokens=3, min_new_tokens=3)
    monkeypatch.setattr(integration, "select_kernel", lambda config, device, hf_config: fused_moe)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="all", MOE_CPU_THREADS=threads or "auto")
    got = pipe.generate_tokens(ids, max_new_tokens=3, min_new_tokens=3)
    stats = pipe.get_offload_stats()
    want_threads = threads or max(1, torch.get_num_threads() - 2)
    assert stats["cpu_expert_layers"] == len(pipe.layers) and stats["cpu_expert_threads"] == want_threads
    assert all(layer.cpu_share.runner.threads == want_threads for layer in pipe.layers)
    assert stats["experts_computed_on_cpu"] > 0 and torch.equal(got, want)


def _tune_on_clock(monkeypatch, layer, seconds):
    """tune_split(layer) on a fake clock: seconds(misses, n_cpu, active) for a forward with `misses` misses, n_cpu
    of them on the CPU, the path in the timer or not (fixed when the timer is made, as decode_timer's graph is)."""
    share, from_host = layer.cpu_share, layer._direct_from_host

    def fake_timer(hidden, first_ids, weights, act_fn):
        active = share.active

        def time_it(ids):
            misses = int(from_host[ids].sum())
            return seconds(misses, share.split_table[misses], active)

        return time_it

    monkeypatch.setattr(layer, "decode_timer", fake_timer)
    return tune_split(layer, torch.nn.functional.silu, repeats=1)


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines; CUDA runs test_hybrid_decode_on_cuda")
def test_tune_split_picks_the_fastest_split(tmp_path, monkeypatch):
    """With a fake clock where the CPU takes 2 units an expert and the GPU 1, the step ends soonest with a third
    of the misses on the CPU; ties go to fewer on the CPU. Unreachable miss counts stay 0."""
    pipe = _direct_pipeline(_tiny_checkpoint(tmp_path), 37, all_on_cpu)
    layer = pipe.layers[0]
    share = layer.cpu_share
    table, timings = _tune_on_clock(monkeypatch, layer, lambda misses, n_cpu, active: max(2.0 * n_cpu, misses - n_cpu))
    resident = layer.table.capacity  # 37% of the tiny model's experts: fewer than top-k, so few misses never occur
    for misses in range(1, layer.top_k + 1):
        if layer.top_k - misses > resident:
            assert table[misses] == 0 and misses not in timings["split"]
        else:
            best = min(max(2.0 * n, misses - n) for n in range(misses + 1))
            assert table[misses] == min(n for n in range(misses + 1) if max(2.0 * n, misses - n) == best)
            assert len(timings["split"][misses]) == misses + 1
            assert timings["off"][misses] == misses  # timed with the path left out: all on the GPU
    assert timings["expected"]["on"] < timings["expected"]["off"]
    assert share.split.tolist() == table == share.split_table


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines; CUDA runs test_hybrid_decode_on_cuda")
@pytest.mark.parametrize("lru", [False, True])
def test_near_ties_go_to_fewer_cpu_experts_only_where_the_gpus_misses_are_cached(tmp_path, monkeypatch, lru):
    """A fake clock where each expert more on the CPU saves 0.2% (at most 0.8% at top-k 4): with LRU admission
    the table keeps to 0 within the 2% tie (what the GPU reads gets cached), without it takes the fastest."""
    layer = _direct_pipeline(_tiny_checkpoint(tmp_path), 37, all_on_cpu, lru=lru).layers[0]
    table, timings = _tune_on_clock(monkeypatch, layer,
                                    lambda misses, n_cpu, active: 1.0 - 0.002 * n_cpu if active else 2.0)
    reached = [m for m in timings["split"] if m > 0]
    assert reached and all(table[m] == (0 if lru else m) for m in reached)


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines; CUDA runs test_hybrid_decode_on_cuda")
def test_tune_split_turns_the_path_off_when_its_fixed_cost_eats_the_gain(tmp_path, monkeypatch):
    """The same clock, plus a cost every step pays while the path is in the layer (its copies and host node):
    the best split gains less than that, so the table is all zeros and the path is left out."""
    pipe = _direct_pipeline(_tiny_checkpoint(tmp_path), 37, all_on_cpu)
    layer = pipe.layers[0]
    share = layer.cpu_share
    table, timings = _tune_on_clock(monkeypatch, layer, lambda misses, n_cpu, active:
                                    max(2.0 * n_cpu, misses - n_cpu) + (1.5 if active else 0.0))
    assert any(min(times) < times[0] for times in timings["split"].values())  # splits do beat n_cpu = 0 ...
    assert timings["expected"]["on"] > timings["expected"]["off"]  # ... but not the layer without the path
    assert table == [0] * (layer.top_k + 1) and not share.active


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines; CUDA runs test_hybrid_decode_on_cuda")
def test_tune_cpu_path_keeps_the_faster_kernel(tmp_path, monkeypatch):
    """Two runners on a fake clock where the second's CPU is twice as fast: it wins, with its own table, and the
    timings of both are kept."""
    pipe = _direct_pipeline(_tiny_checkpoint(tmp_path), 37, all_on_cpu)
    layer = pipe.layers[0]
    share, from_host = layer.cpu_share, layer._direct_from_host
    slow, fast = CpuExperts(threads=1), CpuExperts(threads=1)

    def fake_timer(hidden, first_ids, weights, act_fn):
        def time_it(ids):
            misses = int(from_host[ids].sum())
            n_cpu = share.split_table[misses]
            per_expert = 2.0 if share.runner is slow else 1.0
            return max(per_expert * n_cpu, 1.0 * (misses - n_cpu))

        return time_it

    monkeypatch.setattr(layer, "decode_timer", fake_timer)
    name, table, tunings = tune_cpu_path(layer, torch.nn.functional.silu, {"slow": slow, "fast": fast})
    assert name == "fast" and share.runner is fast and share.split_table == table and set(tunings) == {"slow", "fast"}
    assert share.tuning is tunings
    assert table[layer.top_k] == layer.top_k // 2  # equal speeds: half each


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines; CUDA runs test_hybrid_decode_on_cuda")
def test_tune_split_on_the_real_layer_leaves_counters_alone(tmp_path):
    pipe = _direct_pipeline(_tiny_checkpoint(tmp_path), 0, all_on_cpu)
    layer = pipe.layers[0]
    table, timings = tune_split(layer, torch.nn.functional.silu, repeats=1)
    split = timings["split"]
    assert list(split) == [layer.top_k] and all(t > 0 for t in split[layer.top_k])  # ratio 0: always K misses
    assert list(timings["off"]) == [layer.top_k] and set(timings["expected"]) == {"on", "off"}
    assert all(0 <= n <= m for m, n in enumerate(table))
    counters = layer.counters
    assert (counters.hits, counters.misses, counters.computed_on_cpu) == (0, 0, 0)


def _tiny_checkpoint(tmp_path):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe")
    config.num_experts_per_tok = 4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.skipif(CUDA, reason="the CPU-device variant; CUDA runs test_hybrid_decode_on_cuda")
@pytest.mark.parametrize("ratio", [0, 37])
def test_hybrid_decode_matches_gpu_path(tmp_path, ratio):
    """Zero-copy decode with misses on the CPU gives the all-GPU-path logits (within ATOL) and tokens; the
    counters split misses into read in place and computed on the CPU."""
    path = _tiny_checkpoint(tmp_path)
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    tables = {None: None, "all": all_on_cpu, "half": lambda top_k: [m // 2 for m in range(top_k + 1)]}
    results = {}
    for split, table in tables.items():
        pipe = _direct_pipeline(path, ratio, table)
        with torch.no_grad():
            run = pipe.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        results[split] = (torch.stack(run.logits), run.sequences, pipe.get_offload_stats())
    base_logits, base_tokens, base_stats = results[None]
    for split in ("all", "half"):
        logits, tokens, stats = results[split]
        assert (logits - base_logits).abs().max() <= ATOL and torch.equal(tokens, base_tokens)
        assert (stats["hits"], stats["misses"]) == (base_stats["hits"], base_stats["misses"])
        assert stats["experts_computed_on_cpu"] > 0
        assert stats["experts_computed_on_cpu"] + stats["experts_read_in_place"] == stats["misses"]
        assert stats["bytes_read_in_place"] == stats["experts_read_in_place"] * pipe.layers[0].expert_bytes
    assert results["all"][2]["experts_read_in_place"] < results[None][2]["experts_read_in_place"]


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines")
def test_hybrid_with_device_lru_admits_only_what_the_gpu_reads(tmp_path):
    """MOE_ZERO_COPY=lru with half the misses on the CPU: ratio 100's tokens and every slot holding its expert's
    bytes (that CPU-computed misses are never admitted, and the rest as the host LRU would: test_device_lru)."""
    from moe_offload.kernels.triton_moe import fused_moe

    path = _tiny_checkpoint(tmp_path)
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    reference = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device, lru=True) and layer._device_policy is not None
        assert layer.enable_cpu_share([m // 2 for m in range(layer.top_k + 1)], CpuExperts(threads=1))
    got = pipe.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(got, want)
    stats = pipe.get_offload_stats()
    assert stats["experts_computed_on_cpu"] > 0 and stats["hits"] > 0
    assert stats["experts_computed_on_cpu"] + stats["experts_read_in_place"] == stats["misses"]
    assert all(misplaced(layer) == [] for layer in pipe.layers)


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines")
def test_cpu_share_needs_zero_copy(tmp_path):
    """Ratio 100 (nothing to read in place) or experts only on disk: the layer keeps the GPU path."""
    from moe_offload.kernels.triton_moe import fused_moe

    path = _tiny_checkpoint(tmp_path)
    for ratio, host in ((100, "auto"), (25, 0)):
        pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=host)
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            layer.enable_direct(pipe.device)
            assert not layer.enable_cpu_share(all_on_cpu(layer.top_k), CpuExperts(threads=1))
            assert layer.cpu_share is None


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode, refused", [("auto", False), ("all", False), ("all", True), ("auto", True)])
def test_hybrid_decode_on_cuda(monkeypatch, mode, refused):
    """The shipped model at ratio 0 with misses on the CPU, steps replayed from the graph: ratio 100's tokens,
    with the doorbell (kernels/doorbell.py, unless the driver refuses it) or, forced here as if the driver refused
    stream memory operations, the host-function fallback."""
    from moe_offload.hybrid import driver

    if refused:
        monkeypatch.setattr(driver, "stream_wait_available", lambda device: "refused by the test")
    prompt = torch.randint(2, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    reference = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48)
    reference.close()
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=0, MOE_CPU_EXPERTS=mode)
    got = pipe.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48)
    stats = pipe.get_offload_stats()
    if refused:
        assert stats["cpu_expert_handoff"] == "host_function (stream_wait refused: refused by the test)"
    elif stats["cpu_expert_kernel"] == "numba":  # served by the doorbell, or the driver refused it
        assert stats["cpu_expert_handoff"] == "stream_wait" or \
            stats["cpu_expert_handoff"].startswith("host_function (stream_wait refused: ")
    else:  # tuning chose torch's kernel, which only a host function runs
        assert stats["cpu_expert_handoff"] == "host_function"
    assert stats["cuda_graph_steps"] > 0 and stats["cuda_graph_failure"] is None
    assert stats["experts_computed_on_cpu"] > 0 or mode == "auto"
    check, split = stats["cpu_expert_decode_check"], stats["cpu_expert_split"]
    if mode == "all":
        assert check is None  # nothing tuned, nothing checked
    elif check is None:
        assert not any(split)  # tuning already left the path out
    else:
        assert check["kept"] == any(split)  # whole decodes decided
    assert torch.equal(got, want)
    if mode == "auto" and not refused:  # the next load of this model and placement applies what was measured
        pipe.close()
        again = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=0)
        source = again.get_offload_stats()["cpu_expert_decode_check"]
        assert (source or {}).get("source", "").endswith(".json") or not any(split)
        assert again.get_offload_stats()["cpu_expert_split"] == stats["cpu_expert_split"]
        assert torch.equal(again.generate_tokens(prompt.cuda(), max_new_tokens=48, min_new_tokens=48), want)


class _FakeDecoder:
    """generate() hands out tokens 1 ms apart, or `slow_with_path` ms apart while a share sends work to the CPU;
    records whether each generation found its graph dropped (None), as a change of path needs."""

    def __init__(self, shares, slow_with_path):
        self.shares, self.slow_with_path, self.graph, self.fresh_graph = shares, slow_with_path, "captured", []

    def generate(self, prompt, max_new_tokens, min_new_tokens, streamer):
        self.fresh_graph.append(self.graph is None)
        self.graph = "captured"
        gap = self.slow_with_path if any(share.active for share in self.shares) else 1.0
        streamer.put(prompt)
        clock = [0.0]
        for _ in range(max_new_tokens):
            clock[0] += gap / 1000
            streamer.stamps.append(clock[0])
        streamer.end()


@pytest.mark.parametrize("slow_with_path, kept", [(0.5, True), (1.5, False), (1.01, False)])
def test_check_on_decode_keeps_the_tables_only_if_decode_is_faster(slow_with_path, kept):
    """Whole decodes with and without the path decide (within the 2% tie, kept off); the tables are restored or
    zeroed, and every switch drops the captured graph."""
    shares = [CpuShare(_tier(), 6, 2, 32, table, CpuExperts(threads=1), torch.device("cpu"))
              for table in ([0, 1, 1], [0, 0, 2])]
    decoder = _FakeDecoder(shares, slow_with_path)
    check = check_on_decode(decoder, shares, torch.zeros(1, 3, dtype=torch.long), new_tokens=5, rounds=2)
    assert check["kept"] is kept
    assert check["decode_tok_s"]["off"] == pytest.approx(1000.0)
    assert check["decode_tok_s"]["on"] == pytest.approx(1000.0 / slow_with_path)
    assert [share.split_table for share in shares] == ([[0, 1, 1], [0, 0, 2]] if kept else [[0, 0, 0]] * 2)
    assert decoder.fresh_graph == [True] * 4 and decoder.graph is None


def test_decode_check_times_the_replayed_steps_only():
    """The prefill's token, the eager first step and the capturing step are left out of the rate: capture costs
    differ with the CPU path on and off, while decodes run replays."""
    stamps = _TokenStamps()
    stamps.stamps = [0.0, 0.5, 0.6, 0.9] + [0.9 + 0.01 * step for step in range(1, 11)]  # 10 replays, 10 ms each
    assert stamps.decode_tok_s() == pytest.approx(100.0)
    stamps.stamps = stamps.stamps[:4]  # nothing replayed yet
    assert stamps.decode_tok_s() == 0.0


def test_the_engine_enters_the_hybrid_path_by_one_door():
    """Outside moe_offload/hybrid/, the package imports moe_offload.hybrid itself (its __init__: enable,
    check_decodes, raise_errors, summary), never one of its modules."""
    import ast
    from pathlib import Path

    import moe_offload.hybrid

    root = Path(moe_offload.hybrid.__file__).resolve().parent
    inner = {path.stem for path in root.glob("*.py")} | {"kernels"}
    for path in root.parent.rglob("*.py"):
        if root in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("moe_offload." if node.level else "") + (node.module or "")
                names = {alias.name for alias in node.names}
                assert not module.startswith("moe_offload.hybrid."), (path.name, module)
                assert module.rstrip(".") != "moe_offload.hybrid" or not names & inner, (path.name, names)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("moe_offload.hybrid.") for a in node.names), path.name


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines standing in for CUDA ones")
def test_auto_measures_once_then_applies_the_machines_profile(tmp_path, monkeypatch):
    """MOE_CPU_EXPERTS=auto (the default) measures at the first load of a model and placement, stores kernel and
    table in the machine's profile, and a later load applies them without measuring; `retune` and another
    placement measure again. The CPU pipelines stand in for CUDA ones (the door is told the device is CUDA)."""

    from moe_offload import defaults, hybrid
    from moe_offload.config import make_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hybrid, "machine_key", lambda device: {"gpu": "a test's"})
    monkeypatch.setattr(hybrid.driver, "stream_wait_available", lambda device: "refused by the test")
    measured = []

    def fake_tune(layer, act_fn, runners):
        table = [min(m, 1) for m in range(layer.top_k + 1)]  # one miss of each step on the CPU
        measured.append(table)
        layer.cpu_share.set_table(table)
        return "native", table, {"native": {"expected": {"on": 1.0, "off": 2.0}}}

    monkeypatch.setattr(hybrid, "tune_cpu_path", fake_tune)
    path, cuda = _tiny_checkpoint(tmp_path), torch.device("cuda")

    def load(ratio=25, retune=False):
        pipe = _direct_pipeline(path, ratio)
        sites = [SimpleNamespace(module=SimpleNamespace(act_fn=torch.nn.functional.silu))] * len(pipe.layers)
        config = make_config({"MOE_OFFLOAD_RATIO": ratio})
        tuned = hybrid.enable(pipe.layers, sites, config, cuda, "digest of config.json", retune)
        check = hybrid.check_decodes(None, pipe.layers, tuned, cuda, 64)  # no decoder: the layer's timing decides
        return pipe, tuned, defaults.cpu_experts(config.moe_cpu_experts, cuda, tuned, check, len(pipe.layers))

    _, first, choice = load()
    assert len(measured) == 1 and not first.from_profile and "measured at this load" in choice.why
    stored = first.profile.stored["result"]
    assert (stored["kernel"], stored["table"], stored["kept"]) == ("native", measured[0], True)
    pipe, second, choice = load()
    assert len(measured) == 1 and second.from_profile and second.profile.path == first.profile.path
    assert all(layer.cpu_share.split_table == measured[0] for layer in pipe.layers)
    assert choice.value == f"on (native kernel, split {measured[0]})" and first.profile.path in choice.why
    assert all(layer.cpu_share.tuned_table == measured[0] for layer in pipe.layers)
    second.profile.save({**stored, "kept": False})  # judged slower on decodes: off, the table kept for check_again
    pipe, _, choice = load()
    assert choice.value == "off" and len(measured) == 1
    assert all(layer.cpu_share.split_table == [0] * len(measured[0]) and layer.cpu_share.tuned_table == measured[0]
               for layer in pipe.layers)
    load(retune=True)
    load(ratio=50)
    assert len(measured) == 3


@pytest.mark.parametrize("result", [
    {"kernel": "numba-on-a-machine-without-it", "table": [0, 1, 1, 1, 1], "kept": True},
    {"kernel": "native", "table": [0, 2, 1, 1, 1], "kept": True},  # more on the CPU than there are misses
    {"kernel": "native", "table": [0, 1], "kept": True},  # another top-k
    {"kernel": "native", "table": [0, 1, 1, 1, 1]},  # no verdict
])
def test_a_stored_result_this_load_cannot_apply_is_measured_again(tmp_path, result):
    from moe_offload import hybrid
    from moe_offload.profile import Profile

    profile = Profile({"k": 1}, str(tmp_path))
    profile.save(result)
    assert hybrid._usable(Profile({"k": 1}, str(tmp_path)), ["native"], top_k=4) is None
    profile.save({"kernel": "native", "table": [0, 1, 1, 1, 1], "kept": False})
    assert hybrid._usable(Profile({"k": 1}, str(tmp_path)), ["native"], top_k=4)["kept"] is False


class _Clock:
    """A stand-in for time.perf_counter that the fake decoder below advances."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Share:
    """What hybrid.check_again and tuning.check_on_decode use of a CpuShare."""

    def __init__(self, tuned: list[int] | None, table: list[int]):
        self.tuned_table, self.split_table = tuned, list(table)
        self.runner, self.host = CpuExperts(threads=1), SimpleNamespace(gate_up=None, down=None)  # no copy to make

    def set_table(self, table: list[int]) -> None:
        self.split_table = list(table)

    def check(self) -> None:
        pass


class _Decoder:
    """Greedy decodes whose steps take step_s[CPU path on?] seconds of the fake clock."""

    def __init__(self, shares: list[_Share], clock: _Clock, step_s: dict[bool, float]):
        self.shares, self.clock, self.step_s, self.graph, self.prompts = shares, clock, step_s, None, []

    def generate(self, prompt, max_new_tokens, min_new_tokens, streamer=None):
        self.prompts.append(prompt)
        on = any(any(share.split_table) for share in self.shares)
        streamer.put(prompt)
        for _ in range(max_new_tokens):
            self.clock.now += self.step_s[on]
            streamer.put(None)
        streamer.end()


@pytest.mark.parametrize("cpu_faster", [True, False])
def test_check_again_judges_the_measured_split_on_the_routing_of_now(monkeypatch, cpu_faster):
    """hybrid.check_again: the measured split tables (even where the load's check turned them off) against no CPU
    path on whole greedy decodes of the given prompt, and the faster applied; layers without a measured share are
    left alone, and with none at all there is nothing to judge."""
    from moe_offload.hybrid import tuning

    clock = _Clock()
    monkeypatch.setattr(tuning.time, "perf_counter", clock)
    measured = _Share([0, 1, 1, 2], [0, 0, 0, 0])  # the load turned it off
    unmeasured = _Share(None, [0, 0, 0, 0])
    decoder = _Decoder([measured], clock, {True: 0.001 if cpu_faster else 0.003, False: 0.002})
    layers = [SimpleNamespace(cpu_share=measured), SimpleNamespace(cpu_share=unmeasured),
              SimpleNamespace(cpu_share=None)]
    prompt = torch.zeros((1, 16), dtype=torch.long)
    check = hybrid.check_again(decoder, layers, prompt)
    assert check["kept"] is cpu_faster
    assert check["decode_tok_s"] == pytest.approx({"on": 1000.0 if cpu_faster else 333.3, "off": 500.0}, rel=1e-3)
    assert measured.split_table == ([0, 1, 1, 2] if cpu_faster else [0, 0, 0, 0])
    assert unmeasured.split_table == [0, 0, 0, 0] and all(p is prompt for p in decoder.prompts)
    assert hybrid.check_again(decoder, [SimpleNamespace(cpu_share=unmeasured)], prompt) is None
