"""Per-machine, per-model tuning profiles: what load-time measurement found, kept so only the first load pays.

Why: the hybrid path's CPU kernel and split (hybrid/tuning.py) are measured on the machine that serves, which
costs seconds of every load, yet gives the same answer on the next load of the same model shape, at the same
placement, on the same GPU and CPU, with the same code. So the result is kept as a small JSON file under the
user's cache directory ($XDG_CACHE_HOME/moe-offload/profiles, else ~/.cache/...), named by a digest of its key.
The key holds everything the measurement depends on; a change of any part (a new GPU, another ratio, an upgrade
of moe-offload) misses and measures anew. `moe-offload tune` measures again and overwrites.

This module is the mechanism (keys, files); what is measured and when a profile is used is hybrid/'s business.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
from datetime import datetime, timezone
from typing import Any

import torch

log = logging.getLogger("moe_offload")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def profile_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe-offload", "profiles")


def sources_digest(*folders: str) -> str:
    """sha256 (16 hex digits) over the paths (relative to each folder's parent) and bytes of every .py file under
    `folders`, in sorted order: which source tree ran."""
    digest = hashlib.sha256()
    for top in folders:
        for folder, dirs, files in sorted(os.walk(top)):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "assets"))
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, os.path.dirname(top)).encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the package's Python sources: any change to the code may change what tuning finds."""
    return sources_digest(_PACKAGE)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> dict[str, Any]:
    """The hardware a measurement ran on: the GPU (name, memory) and the CPU (model, cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    key: dict[str, Any] = {"cpu": _cpu_model(), "cores": cores, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key["gpu"] = {"name": props.name, "memory": props.total_memory}
    return key


def file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


class Profile:
    """One key's stored result: `stored` is what the last measurement saved (None: never measured, or unreadable);
    `save(data)` replaces it atomically (a failure to write is logged, never raised: the load goes on)."""

    def __init__(self, key: dict[str, Any], directory: str | None = None):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = os.path.join(directory or profile_dir(), f"{digest}.json")
        self.stored = self._read()

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable tuning profile %s (%s): measuring again", self.path, err)
            return None
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("result"), dict):
            log.warning("ignoring tuning profile %s: it is not one this version wrote for this key", self.path)
            return None
        return data

    def save(self, result: dict[str, Any]) -> str | None:
        """Write {"key", "saved", "result"}; returns the path, or None where it could not be written."""
        data = {"key": self.key, "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "result": result}
        partial = None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".partial")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
            os.replace(partial, self.path)  # never a half-written profile under the real name
        except OSError as err:
            if partial is not None and os.path.exists(partial):
                os.unlink(partial)
            log.warning("could not save the tuning profile %s: %s", self.path, err)
            return None
        self.stored = data
        return self.path

    def forget(self) -> None:
        """Measure again at this load (moe-offload tune): the stored result is ignored and then replaced."""
        self.stored = None
