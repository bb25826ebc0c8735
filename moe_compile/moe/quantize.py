"""Weight-only int4 / int8 experts: the routed experts' matrices rounded to b-bit integers in blocks.

Each expert matrix W [out, in] is cut along `in` into blocks of B weights; block j of row o gets one scale and the
symmetric round-to-nearest integers

    s = max_i |W[o, i]| / q_max,    q = clamp(round(W / s), -q_max, q_max),    q_max = 2^(b-1) - 1,

and the layer keeps W' = q s, the dequantised weights, so that eager PyTorch computes what the exported graph
does. `export` writes each such matrix as b-bit integers and scales behind a blocked DequantizeLinear feeding a
MatMul (standard ONNX, opset 21), which ONNX Runtime runs as one MatMulNBits. Re-rounding W' gives q again, so
the export needs only the dequantised weights and the layer's `expert_weight_bits` = (b, B).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import MoECompileError
from .layer import iter_moe_layers

QUANTIZED_MATRICES = ("up_weight", "gate_weight", "down_weight")  # [E, out, in] each
BITS = (4, 8)


def quantize_blocks(weight: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., out, in], scales float32 [..., out, in / B]) of `weight` [..., out, in] (see the module)."""
    q_max = 2 ** (bits - 1) - 1
    blocks = weight.detach().float().unflatten(-1, (-1, block_size))
    scales = blocks.abs().amax(-1) / q_max
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block stays zero
    q = (blocks / safe.unsqueeze(-1)).round().clamp(-q_max, q_max)
    return q.flatten(-2).to(torch.int8), scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W' = q s, each scale repeated over its block of the last axis."""
    return (q.float().unflatten(-1, (scales.shape[-1], -1)) * scales.unsqueeze(-1)).flatten(-2)


def quantize_experts(model: nn.Module, bits: int = 4, block_size: int = 32) -> nn.Module:
    """Round every MoE layer's routed expert matrices of `model` (in place) to `bits`-bit integers in blocks of
    `block_size` along each matrix's input axis; returns `model`. Biases, routers, shared experts and the rest of
    the model stay as they are. Export then writes the experts as b-bit weights (see the module docstring)."""
    layers = list(iter_moe_layers(model))
    if not layers:
        raise MoECompileError(f"quantize_experts: {type(model).__name__} has no MoE layers. Convert it first with "
                              "moe_compile.convert(model, MoEConfig(...)).")
    if bits not in BITS:
        raise MoECompileError(f"quantize_experts: bits={bits} is not supported; choose 4 or 8.")
    if block_size < 16 or block_size & (block_size - 1):
        raise MoECompileError(f"quantize_experts: block_size={block_size} must be a power of two of at least 16 "
                              "(ONNX Runtime's MatMulNBits takes 16, 32, 64, 128, ...).")
    for name, layer in layers:
        if layer.up_weight.dtype != torch.float32:
            raise MoECompileError(f"quantize_experts: layer {name} is {layer.up_weight.dtype}; weight-only "
                                  "quantization starts from float32 weights (quantize, then export in float32).")
        widths = {matrix: getattr(layer, matrix).shape[-1] for matrix in QUANTIZED_MATRICES
                  if getattr(layer, matrix) is not None}
        uneven = {matrix: width for matrix, width in widths.items() if width % block_size}
        if uneven:
            raise MoECompileError(f"quantize_experts: layer {name}: input widths {uneven} are not multiples of "
                                  f"block_size={block_size}; pass a block size that divides them.")
    for _, layer in layers:
        with torch.no_grad():
            for matrix in QUANTIZED_MATRICES:
                weight = getattr(layer, matrix)
                if weight is not None:
                    weight.copy_(dequantize_blocks(*quantize_blocks(weight, bits, block_size)))
        layer.expert_weight_bits = (bits, block_size)
    return model

