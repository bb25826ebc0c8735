"""The `tensorrt` lowering: one MoELayer -> standard router ops feeding one `moe_compile::moe_ffn` plugin node.

    logits = x W_r^T;  p = softmax(logits);  (g, e) = top-k of p   (g / sum g when the router normalises)
    ids = Cast<int32>(e)    (ONNX TopK gives INT64; TensorRT plugins take INT32)
    y = moe_ffn(x, ids, Cast(g), fc1_w, fc1_b, fc2_w, fc2_b; activation, gated)   (+ b_out, split experts)
                                                                           (+ shared(x), standard ops, when present)

The node is op_type `moe_ffn` in domain `moe_compile`, with the attributes `plugin_namespace = "moe_compile"` and
`plugin_version = "1"` that TensorRT's ONNX parser reads to pick the plugin (export/tensorrt.py registers it), and
the op's own attributes `activation` (string) and `gated` (int). Weights are initializers in the op's layout
(kernels/moe_ffn.py: fc1 = [gate; up] rows, zero biases where the layer has none); an unweighted combine passes
gates of ones. In eager PyTorch the module runs the torch custom op of the same name, so it can be checked there too.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import layer_operands, moe_ffn
from ..moe import MoELayer
from .ort_moe import not_dropless_token_choice, own_modules

PLUGIN_NAMESPACE = "moe_compile"
PLUGIN_NAME = "moe_ffn"
PLUGIN_VERSION = "1"
OP_NAME = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"


def tensorrt_unsupported_reason(layer: MoELayer) -> Optional[str]:
    """Why the moe_ffn plugin cannot compute exactly what `layer` computes, or None when it can."""
    if layer.expert_weight_bits is not None:
        return f"its experts are int{layer.expert_weight_bits[0]} weights, which {PLUGIN_NAME} does not take"
    return not_dropless_token_choice(layer, PLUGIN_NAME) or own_modules(layer, PLUGIN_NAME)


class TensorRTMoE(nn.Module):
    """Router ops plus the moe_ffn node of one MoELayer (the custom op itself when run in eager PyTorch)."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        reason = tensorrt_unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"TensorRTMoE: {reason}")
        self.router = layer.router
        self.activation = layer.activation
        self.gated = layer.gated
        self.weighted = layer.combine == "weighted"
        with torch.no_grad():
            for name, value in layer_operands(layer).items():
                self.register_buffer(name, value.detach().clone())
        output_bias = layer.output_bias
        self.register_buffer("output_bias", None if output_bias is None else output_bias.detach().clone())
        self.shared = copy.deepcopy(layer.shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(F.linear(flat, self.router.weight).float(), dim=-1)
        gates, expert_ids = self.router.select(probs)
        gates = gates.to(x.dtype) if self.weighted else torch.ones_like(gates, dtype=x.dtype)
        operands = (flat, expert_ids.to(torch.int32), gates, self.fc1_weight, self.fc1_bias, self.fc2_weight,
                    self.fc2_bias)
        if torch.compiler.is_exporting():
            attrs = {"activation": self.activation, "gated": int(self.gated), "plugin_namespace": PLUGIN_NAMESPACE,
                     "plugin_version": PLUGIN_VERSION}
            y = torch.onnx.ops.symbolic(OP_NAME, operands, attrs, dtype=x.dtype, shape=flat.shape, version=1)
        else:
            y = moe_ffn(*operands, self.activation, self.gated)
        if self.output_bias is not None:  # dropless: every token has its k rows, so b_out is added everywhere
            y = y + self.output_bias
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(x.shape)
