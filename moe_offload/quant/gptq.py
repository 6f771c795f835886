"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, `quant_method: gptq`) and AWQ's GEMM layout (AutoAWQ,
`quant_method: awq`, the same tensor names packed the other way): their scheme, their tensors, and the repack
into the compressed-tensors planes the engine's kernels read.

Why a repack rather than GPTQ kernels: a GPTQ matrix holds the very integers and scales of a compressed-tensors
pack-quantized asymmetric one, only transposed. For a Linear of W [N, K] (out, in), b bits, G groups:

  qweight  int32 [K*b/32, N]   value k of column n at bits (k % (32/b)) * b of word [k / (32/b), n]
  qzeros   int32 [G, N*b/32]   zero point of (group g, column n) at bits (n % (32/b)) * b of word [g, n / (32/b)]
  scales   float [G, N]
  g_idx    int32 [K]           group of input k: k // group_size unless act-order (desc_act) permuted it

and W[n, k] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k], q and z unsigned b-bit values. So
compressed-tensors' `weight_packed` [N, K*b/32] is qweight transposed word for word (both pack along K, low bits
first), `weight_scale` [N, G] is scales transposed, and `weight_zero_point` [N*b/32, G] (zero points packed down
the rows, unsigned: z_signed + 2^(b-1)) is qzeros transposed: the same bytes per expert, moved. Zero points:
`checkpoint_format` (or `format`) "gptq" (v1, AutoGPTQ's and the default) stores z - 1 in each field, "gptq_v2"
(GPTQModel's) stores z (GPTQModel's gptq v1 -> v2 conversion adds 1 to every field; AutoGPTQ's torch kernel adds
1 after unpacking). A v1 field of 2^b - 1 would mean z = 2^b, which no b-bit field holds (and GPTQModel's packed
addition carries it into the next field): refused in one line when the expert is read.

The repack runs where a checkpoint row becomes an engine row (expert_format.ExpertFormat.copy_row): when the host
tier is filled and on each disk read, by this one function on integers, so every tier holds the same bits.
Act-order with a permuted g_idx is refused (the kernels take groups of consecutive inputs); with desc_act False
the g_idx values are not read, as vLLM's and ExLlama's GPTQ kernels do not read them.

AWQ (version "gemm", int4 with zero points) stores the same integers packed along N instead of K:
  qweight  int32 [K, N/8]   q[k, n] in word [k, n / 8] at nibble AWQ_ORDER.index(n % 8)
  qzeros   int32 [G, N/8]   z[g, n] likewise
  scales   float [G, N]
(AutoAWQ's packer puts column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] in nibble i; its readers undo it with [0, 4, 1, 5,
2, 6, 3, 7]), W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n]), no offset and no g_idx. Its repack
unpacks the nibbles and packs them along K: integers again, the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import MoeOffloadError, read_user_text
from .format import QuantSpec

QWEIGHT, QZEROS, SCALES, G_IDX = "qweight", "qzeros", "scales", "g_idx"
TENSORS = (QWEIGHT, QZEROS, SCALES)  # what an expert's row holds, per projection; g_idx is checked, not held
VERSIONS = {"gptq": 1, "gptq_v2": 2}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


@dataclass(frozen=True)
class GptqScheme:
    """A GPTQ (or AWQ) checkpoint's scheme: the integers' spec (held asymmetric: every GPTQ and AWQ matrix stores
    zero points), the zero-point convention (1: stored z - 1, 2: z) and whether act-order may have permuted
    g_idx."""

    spec: QuantSpec
    version: int
    desc_act: bool
    awq: bool = False  # AWQ's GEMM layout (zero points as they are: version 2's convention)

    @property
    def source(self) -> str:
        """The storage layout's name in expert_format.ExpertFormat.source."""
        return "awq" if self.awq else f"gptq_v{self.version}"

    @property
    def name(self) -> str:
        """'GPTQ v1', 'GPTQ v2' or 'AWQ', for info and messages."""
        return "AWQ" if self.awq else f"GPTQ v{self.version}"


def gptq_scheme(quant: Mapping) -> GptqScheme:
    """config.json's quantization_config for quant_method gptq, or one line naming what is not supported."""
    bits, group_size = quant.get("bits"), quant.get("group_size", 128)
    if bits not in (4, 8):
        raise MoeOffloadError(f"{bits}-bit GPTQ weights are not supported (4 or 8 bits)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise MoeOffloadError(f"GPTQ group_size {group_size!r} is not supported (a positive integer, or -1)")
    layout = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if layout not in VERSIONS:
        raise MoeOffloadError(f"GPTQ checkpoint format {layout!r} is not supported (gptq or gptq_v2)")
    if quant.get("dynamic"):
        raise MoeOffloadError("GPTQ per-module overrides (quantization_config.dynamic) are not supported")
    desc_act = quant.get("desc_act") or False
    if not isinstance(desc_act, bool):
        raise MoeOffloadError(f"GPTQ desc_act {desc_act!r} is not true or false")
    spec = QuantSpec(bits, None if group_size == -1 else group_size, False)
    return GptqScheme(spec, VERSIONS[layout], desc_act)


def awq_scheme(quant: Mapping) -> GptqScheme:
    """config.json's quantization_config for quant_method awq (AutoAWQ's GEMM checkpoints), or one line naming
    what is not supported."""
    bits, group_size = quant.get("bits", quant.get("w_bit")), quant.get("group_size", quant.get("q_group_size", 128))
    if bits != 4:
        raise MoeOffloadError(f"{bits}-bit AWQ weights are not supported (4 bits)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise MoeOffloadError(f"AWQ group_size {group_size!r} is not supported (a positive integer, or -1)")
    layout = str(quant.get("version") or quant.get("format") or "gemm").lower()
    if layout != "gemm":
        raise MoeOffloadError(f"AWQ version {layout!r} is not supported (gemm only)")
    if quant.get("zero_point", True) is not True:
        raise MoeOffloadError("AWQ without zero points (zero_point false) is not supported")
    return GptqScheme(QuantSpec(4, None if group_size == -1 else group_size, False), 2, False, awq=True)


def legacy_config(path: str) -> dict:
    """AutoGPTQ's quantize_config.json (older exports keep the scheme there, not in config.json) as a
    quantization_config; quant_method gptq where it does not say."""
    try:
        quant = json.loads(read_user_text(path, "quantize_config.json"))
    except json.JSONDecodeError as err:
        raise MoeOffloadError(f"quantize_config.json is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(quant, dict):
        raise MoeOffloadError("quantize_config.json is not a JSON object")
    return {"quant_method": "gptq", **quant}


def tensor_shapes(rows: int, cols: int, spec: QuantSpec, awq: bool = False) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of one projection's GPTQ (or AWQ) tensors for W [rows, cols] (out, in); None where the
    layout cannot pack it (what it packs must fill whole int32 words)."""
    per_word = 32 // spec.bits
    if rows % per_word or cols % per_word:
        return None
    groups = 1 if spec.group_size is None else -(-cols // spec.group_size)
    if awq:
        return {QWEIGHT: (cols, rows // per_word), QZEROS: (groups, rows // per_word), SCALES: (groups, rows)}
    return {QWEIGHT: (cols // per_word, rows), QZEROS: (groups, rows // per_word), SCALES: (groups, rows),
            G_IDX: (cols,)}


def plane_specs(inter: int, hidden: int, spec: QuantSpec, dtype: torch.dtype,
                source: str) -> list[tuple[str, tuple, torch.dtype]]:
    """The planes of one expert's row as a GPTQ (or AWQ) checkpoint stores it: per matrix (gate_up: gate's then
    up's tensors, stacked on a leading parts dim; down: one), qweight, scales, qzeros. (ExpertFormat.)"""
    specs = []
    for matrix, parts, rows, cols in (("gate_up", 2, inter, hidden), ("down", 1, hidden, inter)):
        shapes = tensor_shapes(rows, cols, spec, source == "awq")
        assert shapes is not None, "checked at load (checkpoint._gptq_location)"
        specs += [(f"{matrix}.{QWEIGHT}", (parts, *shapes[QWEIGHT]), torch.int32),
                  (f"{matrix}.{SCALES}", (parts, *shapes[SCALES]), dtype),
                  (f"{matrix}.{QZEROS}", (parts, *shapes[QZEROS]), torch.int32)]
    return specs


def repack(src: Mapping[str, torch.Tensor], source: str, bits: int) -> dict[str, torch.Tensor]:
    """The compressed-tensors planes of one expert (expert_format's `<m>.packed`, `<m>.scale`, `<m>.zero`) from
    its GPTQ planes (plane_specs' views of one row, `source` GptqScheme.source): transposes, and for v1 zero
    points one added to each field."""
    if source == "awq":
        return _repack_awq(src, bits)
    version = {f"gptq_v{v}": v for v in VERSIONS.values()}[source]
    out = {}
    for matrix in ("gate_up", "down"):
        qweight, scales, qzeros = (src[f"{matrix}.{name}"] for name in (QWEIGHT, SCALES, QZEROS))
        parts, words, rows = qweight.shape  # [P, K*b/32, N]
        out[f"{matrix}.packed"] = qweight.transpose(1, 2).reshape(parts * rows, words)  # [P*N, K*b/32]
        out[f"{matrix}.scale"] = scales.transpose(1, 2).reshape(parts * rows, -1)  # [P*N, G]
        zero = qzeros.transpose(1, 2).reshape(-1, qzeros.shape[1])  # [P*N*b/32, G]
        out[f"{matrix}.zero"] = zero if version == 2 else _add_one(zero, bits, matrix)
    return out


def _repack_awq(src: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """repack() for AWQ's GEMM planes: values packed along K instead of N, zero points with their nibbles in
    column order, scales transposed, with word-wide shifts and masks. Slower than GPTQ's transposes: ~10 ms per
    Qwen3-30B-A3B-shaped expert on one core of the shared test machine (GPTQ ~1 ms; unpacking to one value per
    element and packing again took 30-70 ms)."""
    out = {}
    for matrix in ("gate_up", "down"):
        qweight, scales, qzeros = (src[f"{matrix}.{name}"] for name in (QWEIGHT, SCALES, QZEROS))
        out[f"{matrix}.packed"] = torch.cat([_awq_values_along_k(part) for part in qweight])  # [P*N, K/8]
        out[f"{matrix}.scale"] = scales.transpose(1, 2).reshape(-1, scales.shape[1])  # [P*N, G]
        out[f"{matrix}.zero"] = _awq_in_column_order(qzeros).transpose(1, 2).reshape(-1, qzeros.shape[1])
    return out


def _awq_values_along_k(words: torch.Tensor) -> torch.Tensor:
    """One projection's AWQ qweight [K, N/8] -> compressed-tensors' packed words [N, K/8]: the word of row
    n = 8c + m and inputs 8w..8w+7 gathers nibble AWQ_ORDER.index(m) of words [8w + j, c], j = 0..7."""
    blocks = words.view(-1, 8, words.shape[1])  # [K/8, 8 (j), N/8]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device).view(1, 8, 1)  # 4j
    out = torch.empty(8, blocks.shape[0], blocks.shape[2], dtype=torch.int64, device=words.device)  # [m, K/8, N/8]
    for nibble, m in enumerate(AWQ_ORDER):
        out[m] = (((blocks >> (4 * nibble)) & 15).to(torch.int64) << shifts).sum(dim=1)  # disjoint bits: an OR
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits, as int32
    return out.permute(2, 0, 1).reshape(-1, blocks.shape[0])  # [N/8, m, K/8] -> [N, K/8]


def _awq_in_column_order(words: torch.Tensor) -> torch.Tensor:
    """AWQ words (any shape) with each word's nibbles moved into column order (nibble m = column 8c + m)."""
    out = torch.zeros_like(words)
    for nibble, m in enumerate(AWQ_ORDER):
        out |= ((words >> (4 * nibble)) & 15) << (4 * m)
    return out


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AWQ words [R, N/8] -> their values in column order, transposed: int64 [N, R] (dequantizing at load)."""
    return _fields(_awq_in_column_order(words), 4, dim=1).t()


def _add_one(words: torch.Tensor, bits: int, matrix: str) -> torch.Tensor:
    """int32 words of b-bit fields -> the same with each field plus one (GPTQ v1's stored z - 1 -> z)."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits  # [per_word]
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & mask  # [R, G, per_word]
    if bool((fields == mask).any()):
        raise MoeOffloadError(f"a GPTQ v1 zero point of {mask + 1} (stored {mask}) in {matrix}: it fits no "
                              f"{bits}-bit field; this checkpoint needs checkpoint_format gptq_v2")
    word = ((fields + 1) << shifts).sum(dim=-1)  # [R, G] in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def check_g_idx(values: torch.Tensor, spec: QuantSpec, name: str) -> None:
    """An act-order (desc_act) g_idx must still be k // group_size: the kernels read groups of consecutive
    inputs, and a permuted one would need the input permuted too."""
    cols = values.numel()
    trivial = torch.arange(cols, dtype=torch.int64) // spec.group_of(cols)
    if not torch.equal(values.to(torch.int64), trivial):
        raise MoeOffloadError(f"{name}: GPTQ act-order (desc_act) with a permuted g_idx is not supported")


# -- GPTQ Linears outside the routed experts (attention, shared experts): dequantized once, at load ---------------

def dense_linears(names) -> dict[str, dict[str, str]]:
    """"X.weight" -> {qweight/qzeros/scales/g_idx: tensor name} for every GPTQ Linear X among `names` (the
    checkpoint's tensors outside the routed experts)."""
    linears: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        if kind in TENSORS + (G_IDX,):
            linears.setdefault(f"{module}.weight", {})[kind] = name
    return {weight: kinds for weight, kinds in linears.items() if QWEIGHT in kinds}


def dense_weight(entries: Mapping, read, shape: tuple[int, int], scheme: GptqScheme, name: str) -> torch.Tensor:
    """W [N, K] of one GPTQ (or AWQ) Linear outside the experts, in its scales' dtype, as GPTQ's torch kernel
    computes it:
    scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), the product rounded once (exact in float32). These are
    held dequantized (attention and shared experts are a small part of a MoE model), so act-order's permuted
    g_idx is simply followed here. entries: kind -> TensorEntry (dtype, shape checked first); read(entry): its
    values."""
    spec, (rows, cols) = scheme.spec, shape
    expected = tensor_shapes(rows, cols, spec, scheme.awq)
    if expected is None:
        raise MoeOffloadError(f"{name}: GPTQ at {spec.bits} bits needs [{rows}, {cols}] in multiples of "
                              f"{32 // spec.bits}")
    for kind, want in expected.items():
        entry = entries.get(kind)
        if entry is None:
            raise MoeOffloadError(f"{name}: checkpoint lacks its GPTQ {kind}")
        integer = kind != SCALES
        if (entry.dtype == torch.int32) != integer or tuple(entry.shape) != want:
            raise MoeOffloadError(f"{entry.name} is {str(entry.dtype).replace('torch.', '')} {list(entry.shape)}, "
                                  f"expected {'int32' if integer else 'floating point'} {list(want)} for a "
                                  f"[{rows}, {cols}] weight at {spec.bits} bits, {spec.grouping}")
    qweight, qzeros, scales = (read(entries[kind]) for kind in (QWEIGHT, QZEROS, SCALES))
    groups = scales.shape[0]
    if scheme.awq:
        g = torch.arange(cols) // spec.group_of(cols)  # [K]
        q, zeros = _awq_columns(qweight).t(), _awq_columns(qzeros).t()  # [K, N], [G, N]
    else:
        g = read(entries[G_IDX]).to(torch.int64)  # [K]
        if bool(((g < 0) | (g >= groups)).any()):
            raise MoeOffloadError(f"{entries[G_IDX].name}: group numbers outside 0..{groups - 1}")
        q = _fields(qweight, spec.bits, dim=0)  # [K, N]
        zeros = _fields(qzeros, spec.bits, dim=1)  # [G, N]
    if scheme.version == 1:
        if bool((zeros == (1 << spec.bits) - 1).any()):
            raise MoeOffloadError(f"{entries[QZEROS].name}: a GPTQ v1 zero point of {1 << spec.bits} (stored "
                                  f"{(1 << spec.bits) - 1}) fits no {spec.bits}-bit field; this checkpoint needs "
                                  "checkpoint_format gptq_v2")
        zeros = zeros + 1
    weight = (q - zeros[g]).float() * scales.float()[g]  # [K, N], exact
    return weight.to(scales.dtype).t()  # [N, K]


def _fields(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words packed along `dim` (first value lowest) -> their unsigned b-bit values, int64, that dim
    32/b times longer."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per_word, dtype=torch.int64) * bits  # [per_word]
    values = (words.to(torch.int64).unsqueeze(dim + 1) >> shifts.view(-1, *([1] * (words.dim() - dim - 1)))) & mask
    shape = list(words.shape)
    shape[dim] *= per_word
    return values.reshape(shape)
