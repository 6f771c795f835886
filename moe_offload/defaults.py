"""What the properties left at "auto" become on this machine, and why: the one home of those decisions.

Why: a user who sets nothing but MOE_OFFLOAD_RATIO should get the fastest configuration we know on the machine
they run on, and be told at load what was chosen and why (LLMPipeline.choices, logged to the "moe_offload"
logger, printed by the CLI). Each function returns a Choice; integration.py and pipeline.py only apply them.
- MOE_HOST_CACHE: every expert of the offloaded layers in host RAM where MemAvailable allows (a host tier that
  holds all of a layer's experts lets the GPU read its misses in place and cache them: LRU admission), sized from
  MemAvailable, not free RAM, since a page cache just filled by a download is RAM we may have.
- MOE_HOST_EMBEDDINGS: the input embedding table in pinned host RAM on CUDA whenever experts are offloaded: a
  token reads one row of it, and its device bytes (622 MB for Qwen3-30B-A3B) would otherwise sit idle.
- MOE_CPU_EXPERTS: the hybrid CPU/GPU decode path, kept where whole decodes measure faster (hybrid/), its
  measurement stored per machine and model (profile.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GiB = 2**30
# RAM left to everything else when the host tier is sized: the larger of these two
HOST_RESERVE_BYTES = 2 * GiB
HOST_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Choice:
    """One property's value at this load, as a user would write it, and why it has that value."""

    name: str
    value: str
    why: str

    def line(self) -> str:
        return f"{self.name}={self.value}: {self.why}"


def memory_info(path: str = "/proc/meminfo") -> dict[str, int]:
    """{"total", "available"} in bytes: MemTotal and MemAvailable (free RAM plus what the kernel can reclaim, such
    as the page cache). Without /proc/meminfo: sysconf's total and free pages."""
    fields = {}
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    if len(fields) < 2:
        page = os.sysconf("SC_PAGE_SIZE")
        return {"total": os.sysconf("SC_PHYS_PAGES") * page, "available": os.sysconf("SC_AVPHYS_PAGES") * page}
    return {"total": fields["MemTotal"], "available": fields["MemAvailable"]}


def format_bytes(count: int) -> str:
    return f"{count / GiB:.1f}GiB" if count >= GiB / 10 else f"{count / 2**20:.0f}MiB"


def host_cache(user_bytes: int | None, needed: int, memory: dict[str, int] | None = None) -> tuple[int, Choice]:
    """Bytes of host RAM for the host tier: `user_bytes` where set, else all `needed` (every expert of the
    offloaded layers) if MemAvailable holds them with the reserve left over, else what it holds (the rest stay on
    disk)."""
    if user_bytes is not None:
        return user_bytes, Choice("MOE_HOST_CACHE", format_bytes(user_bytes), "set by the user")
    if needed == 0:
        return 0, Choice("MOE_HOST_CACHE", "0", "every routed expert is resident on the device")
    memory = memory or memory_info()
    reserve = max(HOST_RESERVE_BYTES, int(memory["total"] * HOST_RESERVE_FRACTION))
    spare = max(0, memory["available"] - reserve)
    if needed <= spare:
        return needed, Choice("MOE_HOST_CACHE", format_bytes(needed),
                              f"holds every expert of the offloaded layers ({format_bytes(memory['available'])} of RAM "
                              f"available, {format_bytes(reserve)} left to the rest)")
    return spare, Choice("MOE_HOST_CACHE", format_bytes(spare),
                         f"{format_bytes(memory['available'])} of RAM available cannot hold the "
                         f"{format_bytes(needed)} of the offloaded layers' experts and leave {format_bytes(reserve)}: "
                         "experts that do not fit are read from the checkpoint on a miss (disk tier)")


def host_embeddings(mode: str, device: torch.device, ratio: int, hostable_reason: str | None) -> tuple[bool, Choice]:
    """Whether the input embedding table goes to pinned host RAM. `hostable_reason`: None where the model's table
    can live there (host_embeddings.why_not_hostable), else why not."""
    name = "MOE_HOST_EMBEDDINGS"
    if mode == "off":
        return False, Choice(name, "off", "set by the user")
    why_not = ("it needs a CUDA device" if device.type != "cuda" else hostable_reason)
    if mode == "on":
        if why_not is not None:
            from .errors import MoeOffloadError

            raise MoeOffloadError(f"MOE_HOST_EMBEDDINGS=on is not possible here: {why_not}")
        return True, Choice(name, "on", "set by the user")
    if why_not is not None:
        return False, Choice(name, "off", why_not)
    if ratio == 100:
        return False, Choice(name, "off", "every expert is resident, so the model fits on the device as it is")
    return True, Choice(name, "on", "experts are offloaded: the table's device memory is saved, and a token "
                                    "reads only its own row of it over PCIe")


def cpu_experts(mode: str, device: torch.device, tuned, check: dict | None, enabled_layers: int,
                refused: str | None = None) -> Choice:
    """What MOE_CPU_EXPERTS came to: `tuned` (hybrid.Tuned or None), the decode check's result, how many
    layers got a CPU share, and why the path cannot take these experts at all (hybrid.unsupported), if so: no
    format the engine holds today, since dense and int4/int8 quantized experts both run on the CPU path, so a
    quantized model gets the path measured and kept where it pays like any other."""
    name = "MOE_CPU_EXPERTS"
    if mode in ("off", "all"):
        return Choice(name, mode, "set by the user")
    if device.type != "cuda":
        return Choice(name, "off", "on a CPU device every expert already runs on the CPU")
    if refused is not None:
        return Choice(name, "off", refused)
    if tuned is None or not enabled_layers:
        return Choice(name, "off", "no layer reads misses in place from host RAM (every expert is resident, or "
                                   "experts are on the disk tier)")
    kept = (check or {}).get("kept", any(tuned.table)) and any(tuned.table)
    rates = (check or {}).get("decode_tok_s") or {}
    measured = (f"decode {rates['on']:.1f} tok/s with the CPU share, {rates['off']:.1f} without"
                if rates.get("on") is not None and rates.get("off") is not None
                else "a layer's step measured faster" if kept else "a layer's step measured no faster with it")
    where = f"from this machine's profile {tuned.profile.path}" if tuned.from_profile else \
        "measured at this load" + (f", kept in {tuned.profile.path}" if tuned.profile.stored else "")
    value = f"on ({tuned.kernel} kernel, split {tuned.table})" if kept else "off"
    copy = (f"; the kernel's repacked copy of the host tier's experts takes {tuned.copy_bytes / 2**30:.1f}GiB of "
            "RAM" if kept and tuned.copy_bytes else "")
    return Choice(name, value, f"{measured}; {where} (`moe-offload tune` measures again){copy}")
