"""Where and with what a result was measured: one definition for every report the project writes."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"moe_offload": __version__, "torch": str(torch.__version__),
            "transformers": str(transformers.__version__), "python": platform.python_version()}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
