"""moe-offload: run Hugging Face Mixture-of-Experts checkpoints with only part of the experts on the GPU."""

from .config import OffloadConfig
from .errors import MoeOffloadError
from .generation import GenerationConfig
from .pipeline import LLMPipeline

__all__ = ["LLMPipeline", "GenerationConfig", "OffloadConfig", "MoeOffloadError"]
__version__ = "0.1.0"
