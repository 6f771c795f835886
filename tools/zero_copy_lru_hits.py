"""Hit rates of zero-copy's fixed resident set against device-side LRU admission (MOE_ZERO_COPY=static vs lru) on
the shipped trained model, on the CPU (Triton's interpreter runs the GPU kernels): one prompt of library source,
its prefill, then 48 greedy tokens; the counters cover that prompt's prefill and the 48 decode steps.

Usage: TRITON_INTERPRET=1 python tools/zero_copy_lru_hits.py
"""

import os

from moe_offload import LLMPipeline
from moe_offload.kernels.triton_moe import fused_moe

PROMPT_FILE = os.path.join(os.path.dirname(__file__), "..", "moe_offload", "tools", "trace.py")


def main() -> None:
    with open(PROMPT_FILE, encoding="utf-8") as handle:
        prompt = handle.read()[:600]
    for ratio in (25, 50):
        for lru in (False, True):
            pipe = LLMPipeline(None, "cpu", MOE_OFFLOAD_RATIO=ratio)
            for layer in pipe.layers:  # on the CPU the Triton kernel (and so zero-copy) is opt-in
                layer.fused_moe = fused_moe
                layer.enable_direct(pipe.device, lru=lru)
            ids = pipe.tokenizer(prompt, return_tensors="pt")["input_ids"]
            pipe.reset_offload_stats()
            pipe.generate_tokens(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)
            stats = pipe.get_offload_stats()
            print(f"ratio {ratio} {'lru' if lru else 'static'}: hit rate {stats['hit_rate']:.3f} "
                  f"({stats['hits']} hits, {stats['misses']} misses)")


if __name__ == "__main__":
    main()
