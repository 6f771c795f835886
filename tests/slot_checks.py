"""What the tests of device-side admission (device LRU, LFRU, hybrid, quantized pools) check alike:
where the device put each expert, and that every slot holds its expert's bytes."""

from __future__ import annotations


def resident(layer) -> dict[int, int]:
    """expert -> device slot of an OffloadedExperts on the direct path, as its slot map says now (one sync)."""
    return {e: s for e, s in enumerate(layer._direct_slots.tolist()) if s < layer.table.capacity}


def misplaced(layer) -> list[int]:
    """The resident experts whose device slot does not hold their host-tier row, byte for byte (every plane)."""
    return [e for e, s in resident(layer).items() if not layer.slots[s].cpu().equal(layer.host.row(e).cpu())]


def admit_on_the_device(pipe, fused_moe) -> None:
    """Every layer of `pipe` on the Triton zero-copy path with its decode misses admitted by the device form of its
    cache policy (a CUDA load's default; the CPU tests pass fused_moe to run it in Triton's interpreter)."""
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device, lru=True) and layer.lru_admission
