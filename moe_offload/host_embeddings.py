"""The input embedding table in page-locked host RAM, read in place by the GPU (MOE_HOST_EMBEDDINGS; defaults.py
says when it is on).

Why: a decode step reads one row of it (4 KiB for Qwen3-30B-A3B), yet on the device the table costs
vocab x hidden x 2 bytes (151,936 x 2048 bf16 = 622 MB of the 1.7 GB of non-expert weights), as much as 66
experts. llama.cpp keeps its token embeddings in host memory too, which matters when both are compared at equal
GPU memory. A Triton gather (kernels/triton_dense.embedding) reads each token's row over PCIe from the mapped
table, so decode steps stay capturable in CUDA graphs. Only for a plain nn.Embedding whose weight the output
layer does not share (a tied lm_head reads the whole table every token: it must stay on the device).

At load the table is allocated in host RAM from the start (integration.py, via hostable_input_embedding), never
on the device: peak device memory is what counts against llama.cpp, and a table loaded on the device and moved
off afterwards would still be in the load's peak.
"""

from __future__ import annotations

import importlib.util
import types

import torch

from .tiers import pin_for_lifetime


def why_not_hostable(model: torch.nn.Module) -> str | None:
    """None where the model's input embedding table can live in host RAM (see the module docstring), else why
    not. Works on a meta-device model too (before loading)."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    output = model.get_output_embeddings()
    output_weight = getattr(output, "weight", None) if output is not None else None
    if (type(embedding).forward is not torch.nn.Embedding.forward or "forward" in embedding.__dict__  # moved
            or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0
            or getattr(embedding, "max_norm", None) is not None):
        return "the input embedding is not a plain table lookup"
    if (output_weight is weight or getattr(model.config, "tie_word_embeddings", False)
            or (output_weight is not None and weight.device.type != "meta"
                and output_weight.data_ptr() == weight.data_ptr())):
        return "the table is tied to the output layer, which reads all of it every token"
    if importlib.util.find_spec("triton") is None:
        return "its gather kernel needs triton"
    return None


def hostable_input_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The model's input embedding if its table can live in host RAM (why_not_hostable), else None."""
    return model.get_input_embeddings() if why_not_hostable(model) is None else None


def move_input_embeddings_to_host(model: torch.nn.Module, device: torch.device | None = None,
                                  force: bool = False) -> int:
    """Device bytes the table no longer takes (0 where it does not apply). `device`: where the model runs
    (default: where the table is; a table loaded into host RAM for a CUDA model passes the CUDA device). On CUDA;
    on a CPU device only with `force` (the tests: Triton's interpreter reads the table where it is)."""
    embedding = hostable_input_embedding(model)
    if embedding is None:
        return 0
    weight = embedding.weight
    device = weight.device if device is None else torch.device(device)
    if device.type != "cuda" and not force:
        return 0
    table = (weight.detach() if weight.device.type == "cpu" else weight.detach().to("cpu", copy=True)).contiguous()
    if device.type == "cuda":
        keeper = pin_for_lifetime(embedding, [table])
        if keeper is None:  # cudaHostRegister refused: the table stays on (or goes to) the device
            if weight.device != device:
                embedding.weight = torch.nn.Parameter(weight.detach().to(device), requires_grad=False)
            return 0
    freed = weight.numel() * weight.element_size()
    # an empty parameter of the same dtype on the model's device: model.device / model.dtype still say where the
    # model runs
    embedding.weight = torch.nn.Parameter(weight.new_empty((0, weight.shape[1]), device=device),
                                          requires_grad=False)
    embedding.host_table = table
    embedding.forward = types.MethodType(_host_forward, embedding)
    return freed


def host_table_bytes(model: torch.nn.Module) -> int:
    """Bytes of the input embedding table held in host RAM instead of on the device (0: it is not)."""
    table = getattr(model.get_input_embeddings(), "host_table", None)
    return 0 if table is None else table.numel() * table.element_size()


def _host_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    from .kernels import triton_dense

    return triton_dense.embedding(input_ids, self.host_table)  # [..., H]
