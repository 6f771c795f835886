"""Triton kernels under test on a machine without CUDA: the interpreter, made to round bfloat16 like a GPU.

Import this before anything imports triton (test modules do so at their top): without CUDA it sets
TRITON_INTERPRET=1, or skips the importing test module if triton was already imported compiled-only. The
interpreter gets bfloat16 wrong in two ways: tl.dot multiplies the raw bit patterns (triton-lang/triton#11584)
and float32 -> bfloat16 casts truncate where GPUs round to nearest even. `gpu_like_bf16(monkeypatch)` patches
both for one test; BF16_PATCHES is None where the interpreter's internals have moved (then bf16 tests that need
them skip) or on CUDA (nothing to patch).
"""

import os
import sys

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":  # its tl.* helpers are compiled-only
        pytest.skip("triton was imported before this module could set TRITON_INTERPRET=1; set it in the environment",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")


def _interpreter_bf16_patches():
    """(InterpreterBuilder, {name: replacement}) that make bf16 behave as on a GPU, or None."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
        create_dot, cast_impl = builder.create_dot, builder.cast_impl
    except (ImportError, AttributeError):
        return None

    def widen(h):  # bf16 (stored as uint16) -> the exact float32
        if h.dtype.scalar != tl.bfloat16:
            return h
        return handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot(self, a, b, d, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:  # round to nearest even
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            return handle(((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    return builder, {"create_dot": dot, "cast_impl": cast}


BF16_PATCHES = None if CUDA else _interpreter_bf16_patches()


def gpu_like_bf16(monkeypatch) -> None:
    """Patch the interpreter's bf16 dot and casts for the current test (no-op on CUDA or without the patches)."""
    if BF16_PATCHES is not None:
        builder, patches = BF16_PATCHES
        for name, replacement in patches.items():
            monkeypatch.setattr(builder, name, replacement)


def force_path(monkeypatch, path: str) -> None:
    """Make fused_moe take its GEMV ("decode") or grouped-GEMM ("prefill") path whatever the pair count; "auto"
    leaves its threshold as it is."""
    from moe_offload.kernels import triton_moe  # after TRITON_INTERPRET is set, above

    if path in ("decode", "prefill"):
        monkeypatch.setattr(triton_moe, "DECODE_MAX_PAIRS", 1 << 30 if path == "decode" else 0)


def check_read_through_admission(x, ids, weights, rows, fmt, slots, capacity: int = 4) -> None:
    """fused_moe's read-through caching on byte-row pools of any format (`fmt`, expert_format.ExpertFormat): with
    slots 0..capacity-1 on the device and every expert in pinned host rows, the misses of token 0 given an admit
    slot land in it byte for byte in every plane, and the outputs equal those of the call without admission.
    rows uint8 [E, B]: the experts; slots int32 [E]: each expert's row."""
    import torch

    from moe_offload.kernels import triton_moe

    host_rows = rows.cpu()  # every expert on the host, as the tier holds them all
    if CUDA:
        host_rows = host_rows.pin_memory()
    device_rows = rows[:capacity].clone()  # slots 0..capacity-1 hold the experts whose row is there
    mapped = torch.where(slots < capacity, slots, capacity + slots).to(torch.int32)
    needed = ids[0].tolist()
    misses = [e for e in needed if mapped[e] >= capacity]
    free = [s for s in range(capacity) if int((slots == s).nonzero()[0]) not in needed][:len(misses)]
    assert misses and len(free) == len(misses)
    admit = torch.full_like(mapped, -1)
    for expert, slot in zip(misses, free):
        admit[expert] = slot
    host = fmt.weights(host_rows)
    plain_pool = fmt.weights(device_rows.clone())
    plain = triton_moe.fused_moe(x, ids, weights, plain_pool.gate_up, plain_pool.down, mapped,
                                 host_w13=host.gate_up, host_w2=host.down)
    pool = fmt.weights(device_rows)
    admitted = triton_moe.fused_moe(x, ids, weights, pool.gate_up, pool.down, mapped, host_w13=host.gate_up,
                                    host_w2=host.down, admit_slot_of_expert=admit)
    assert torch.equal(admitted, plain)
    for expert, slot in zip(misses, free):
        resident = fmt.plane_views(device_rows[slot].cpu())
        stored = fmt.plane_views(host_rows[int(slots[expert])])
        for name in resident:  # as bytes: FP8 planes compare bit for bit, -0.0 and NaN codes included
            assert torch.equal(resident[name].view(torch.uint8), stored[name].view(torch.uint8)), name
