"""Weight-only quantization of routed experts into compressed-tensors `pack-quantized` checkpoints.

format.py is the format (tensor names, dtypes, shapes, packing, the reference dequantize, config.json's
`quantization_config`); methods.py chooses scales (rtn, mse); shards.py writes safetensors shards planned
ahead; writer.py streams a checkpoint through them; command.py is `moe-offload quantize`. fp8.py is the FP8
block-quantized format read from DeepSeek-V3 / Qwen3-FP8 checkpoints (read only, never written).
"""
