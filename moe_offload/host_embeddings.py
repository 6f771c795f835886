"""The input embedding table in page-locked host RAM, read in place by the GPU (MOE_HOST_EMBEDDINGS=on).

Why: a decode step reads one row of it (4 KiB for Qwen3-30B-A3B), yet on the device the table costs
vocab x hidden x 2 bytes (151,936 x 2048 bf16 = 622 MB of the 1.7 GB of non-expert weights), as much as 66
experts. llama.cpp keeps its token embeddings in host memory too, which matters when both are compared at equal
GPU memory. A Triton gather (kernels/triton_dense.embedding) reads each token's row over PCIe from the mapped
table, so decode steps stay capturable in CUDA graphs. Only for a plain nn.Embedding whose weight the output
layer does not share (a tied lm_head reads the whole table every token: it must stay on the device).
"""

from __future__ import annotations

import importlib.util
import types

import torch

from .tiers import pin_for_lifetime


def move_input_embeddings_to_host(model: torch.nn.Module, force: bool = False) -> int:
    """Device bytes freed (0 where it does not apply). On CUDA with triton; on a CPU device only with `force`
    (the tests: Triton's interpreter reads the table where it is)."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    output = model.get_output_embeddings()
    if (type(embedding).forward is not torch.nn.Embedding.forward or "forward" in embedding.__dict__  # moved
            or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0
            or getattr(embedding, "max_norm", None) is not None
            or (output is not None and getattr(output, "weight", None) is not None
                and output.weight.data_ptr() == weight.data_ptr())):
        return 0
    if weight.device.type != "cuda" and not force:
        return 0
    if importlib.util.find_spec("triton") is None:
        return 0
    table = weight.detach().to("cpu", copy=True).contiguous()  # [V, H]
    if weight.device.type == "cuda":
        keeper = pin_for_lifetime(embedding, [table])
        if keeper is None:  # cudaHostRegister refused: keep the table on the device
            return 0
    freed = weight.numel() * weight.element_size()
    # an empty parameter of the same dtype and device: model.device / model.dtype still say where the model runs
    embedding.weight = torch.nn.Parameter(weight.new_empty((0, weight.shape[1])), requires_grad=False)
    embedding.host_table = table
    embedding.forward = types.MethodType(_host_forward, embedding)
    return freed


def _host_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    from .kernels import triton_dense

    return triton_dense.embedding(input_ids, self.host_table)  # [..., H]
