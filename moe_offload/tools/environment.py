"""Where and with what a result was measured: one definition for every report the project writes."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import torch


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"moe_offload": __version__, "torch": str(torch.__version__),
            "transformers": str(transformers.__version__), "python": platform.python_version()}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_report(path: str, report: dict[str, Any]) -> None:
    """A benchmark's JSON report at `path` (its folder made if need be), replaced whole: a script that rewrites
    its report as it goes never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    os.replace(path + ".tmp", path)
