"""Prefetch: a decode step's experts guessed before its router runs, and copied in while attention computes.

Why: on a decode step the PCIe link idles while a layer's attention, norms and router run, then carries the
layer's misses on the step's critical path. The residual stream entering a decoder layer already tells much of
what its router will pick: the layer's router applied to it through the layer's post-attention norm (skipping
the attention that has not run yet) finds most of the true top-k (bench/RESULTS.md, "Routing prediction").
Here, at each decode step, a hook before every prefetching decoder layer computes that guess and hands it to the
layer's OffloadedExperts.prefetch, which admits up to MOE_PREFETCH of the guessed experts that are not cached
(the device LRU's plan, policy/device_lru.py) and copies them in from the host tier (kernels/triton_rows.py), all
on a side stream beside the attention; a hook before the layer's MoE block makes the step wait for it. A right
guess is a miss turned into a hit whose bytes crossed the link while it idled; a wrong one is bytes moved for
nothing and a slot taken from the LRU's order. How many experts to prefetch per step is the budget: what fits
in the attention's time (bench/cache_policy_learned.py scores budgets on learned routing).

Results are the same bits with or without it: a prefetch changes which slot holds an expert, never its bytes.
Decode steps only (one token): a prefill needs most experts anyway. Layers of the Qwen3-MoE shape
(post_attention_layernorm, mlp.gate with a weight); others run without.
"""

from __future__ import annotations

import torch

from .cache import OffloadedExperts


def router_guess(block, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, K] the experts block's router would pick for the residual `hidden` [..., H] entering the decoder layer,
    best first: its gate on its post-attention norm of that residual (attention not applied)."""
    normed = block.post_attention_layernorm(hidden.reshape(-1, hidden.shape[-1]))  # [T, H]
    logits = torch.nn.functional.linear(normed, block.mlp.gate.weight)  # [T, E]
    return torch.softmax(logits, dim=-1, dtype=torch.float).topk(top_k, dim=-1).indices  # [T, K]


def guessable(block) -> bool:
    """Whether router_guess applies to this decoder layer (the Qwen3-MoE shape)."""
    return hasattr(block, "post_attention_layernorm") and hasattr(getattr(getattr(block, "mlp", None), "gate", None),
                                                                   "weight")


class Prefetcher:
    """The hooks that prefetch for every layer that can (OffloadedExperts.enable_prefetch), and their side stream."""

    def __init__(self, decoder_layers, runtimes: list[OffloadedExperts], limit: int, device: torch.device):
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.layers: list[int] = []
        # layer -> the residual a side-stream prefetch reads, held until the step joins it (so its memory is not
        # reused by the main stream meanwhile)
        self._in_flight: dict[int, torch.Tensor] = {}
        for runtime in runtimes:
            block = decoder_layers[runtime.layer] if runtime.layer < len(decoder_layers) else None
            if block is None or not guessable(block) or not runtime.enable_prefetch(limit):
                continue
            block.register_forward_pre_hook(self._before_layer(runtime, block), with_kwargs=True)
            block.mlp.register_forward_pre_hook(self._before_moe(runtime.layer))
            self.layers.append(runtime.layer)

    def _before_layer(self, runtime: OffloadedExperts, block):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H] the residual entering the layer
            if hidden.shape[:-1].numel() != 1:  # decode steps only
                return None
            if self.side is None:
                self._prefetch(runtime, block, hidden)
                return None
            self.side.wait_stream(torch.cuda.current_stream(hidden.device))  # the residual is ready
            with torch.cuda.stream(self.side):
                self._prefetch(runtime, block, hidden)
            self._in_flight[runtime.layer] = hidden
            return None
        return hook

    def _prefetch(self, runtime: OffloadedExperts, block, hidden: torch.Tensor) -> None:
        with torch.no_grad():
            guess = runtime.predict_source() if runtime.predict_source is not None else \
                router_guess(block, hidden, runtime.top_k)  # [1, K]
            runtime.prefetch(guess)

    def _before_moe(self, layer: int):
        def hook(module, args):
            hidden = self._in_flight.pop(layer, None)
            if hidden is not None:  # the step's plan and kernels read the slots the prefetch wrote
                torch.cuda.current_stream(hidden.device).wait_stream(self.side)
            return None
        return hook
