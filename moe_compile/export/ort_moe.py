"""The `ort` lowering: one MoELayer -> one ONNX Runtime `com.microsoft.MoE` node.

What the op computes (ONNX Runtime >= 1.23 CPU kernel, checked against our eager layer in the tests):

    p = softmax(router_logits)                              input 1
    (g, e) = top-k of p;  g <- g / sum(g)  when normalize_routing_weights = 1
    y = sum_i g_i FFN_{e_i}(x)                              every token, no capacity (dropless)
    FFN_e(x) = fc2_w[e] act(fc1_w[e] x + fc1_b[e]) + fc2_b[e]        activation_type relu | gelu (tanh) | silu
             = fc2_w[e] (silu(g) * u) + fc2_b[e], [g0, u0, g1, u1, ...] = fc1_w[e] x + fc1_b[e]
                                                            swiglu with swiglu_fusion=1 (interleaved rows)

The op's top-k breaks ties its own way (the CPU kernel: the higher expert index; the CUDA one: the lower), so
the experts are chosen outside it, by the router's own rule (`top_k`: the lower index), and input 1 holds the
logits with every expert not chosen masked to -inf: the op then has exactly k finite logits to pick, and its gates
are the renormalised ones, softmax over the k = p_i / s with s = sum of the chosen p. A layer whose gates are p
itself (switch, token choice without normalize) multiplies the op's output by s. An unweighted layer (split
experts: y = sum of the k chosen FFN outputs) gives every chosen expert the logit 0: the op's gates are 1/k each,
and the output is multiplied by k (exact when k is a power of two; otherwise within one rounding of 1/k).

A shared output bias (split experts) is an Add after the node, and so is a shared expert's output (split
experts with shared neurons), computed with standard ops beside it. `ort_unsupported_reason` says why a layer
computes something the op cannot; such layers keep the portable lowering.

A layer with int4 experts (`quantize_experts(bits=4, block_size=B)`) becomes `com.microsoft.QMoE` instead: the
same inputs and gates, each expert matrix [out, in] as the integers q of its grid stored as q + 8 (the op's
default zero point), two to a byte, the even input index in the low nibble ([E, out, in / 2] uint8, the raw layout:
weights_prepacked = 0), and its scales [E, out, in / B], so that the op dequantises W' = q s, the eager layer's
weights; accuracy_level 0 keeps float32 activations (max abs 6e-7 against the dequantised weights on one layer).
int8 experts stay portable: the CPU kernel computes block-wise int8 experts on int8-quantised activations only
(1.5e-2 off on outputs of magnitude 1.7 in the same check; per-channel int8, which quantize_experts does not
write, is exact).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe import MoELayer, activation_name
from ..moe.quantize import quantize_blocks
from ..moe.routers import top_k

OP_NAME = "com.microsoft.MoE"
QUANTIZED_OP_NAME = "com.microsoft.QMoE"

# our activation name -> the op's activation_type (gelu there is the tanh approximation)
_PLAIN_ACTIVATIONS = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu"}


def ort_unsupported_reason(layer: MoELayer) -> Optional[str]:
    """Why com.microsoft.MoE cannot compute exactly what `layer` computes, or None when it can."""
    reason = not_dropless_token_choice(layer, OP_NAME) or own_modules(layer, OP_NAME)
    if reason:
        return reason
    if layer.gated and layer.activation != "silu":
        return f"gated {layer.activation} FFN; the CPU kernel of com.microsoft.MoE fuses only SwiGLU (silu gate)"
    if not layer.gated and layer.activation == "gelu":
        return "erf GELU; com.microsoft.MoE's gelu is the tanh approximation (about 3e-4 away)"
    if not layer.gated and layer.activation not in _PLAIN_ACTIVATIONS:
        return f"activation {layer.activation!r} is not among com.microsoft.MoE's activation types"
    if layer.expert_weight_bits is not None and layer.expert_weight_bits[0] != 4:
        bits, block_size = layer.expert_weight_bits
        return (f"its experts are int{bits} weights in blocks of {block_size}; {QUANTIZED_OP_NAME}'s CPU kernel "
                "computes block-wise int8 experts on int8-quantised activations only (about 1e-2 off), not what "
                "eager computes")
    return None


def ort_node_name(layer: MoELayer) -> str:
    """The node `layer` becomes in the `ort` target: QMoE for int4 experts, else MoE."""
    return OP_NAME if layer.expert_weight_bits is None else QUANTIZED_OP_NAME


def own_modules(layer: MoELayer, op: str) -> Optional[str]:
    """Why `layer` computes part of its experts with the model's own modules (a learned activation, a hidden norm),
    which a fused MoE op has no attribute for, or None when it does not."""
    kept = []
    if not isinstance(layer.activation, str):
        kept.append(f"activation {activation_name(layer.activation)}")
    if layer.hidden_norm is not None:
        kept.append(f"hidden norm {type(layer.hidden_norm).__name__}")
    return f"its experts apply the model's own {' and '.join(kept)}, which {op} cannot express" if kept else None


def not_dropless_token_choice(layer: MoELayer, op: str) -> Optional[str]:
    """Why `layer` is not dropless token choice (all that a fused MoE op computes), or None when it is."""
    router = layer.router
    if router.routing == "expert_choice":
        return f"expert-choice routing (experts pick tokens); {op} takes each token's k expert choices"
    if may_drop(router.capacity_factor, router.top_k, router.num_experts):
        return (f"capacity_factor={router.capacity_factor} may drop tokens; {op} is dropless "
                "(use capacity_factor=None, or >= num_experts/top_k, for a dropless model)")
    return None


def may_drop(capacity_factor: Optional[float], top_k: int, num_experts: int) -> bool:
    """Token choice keeps every choice iff C = min(ceil(cf T k / E), T) = T for every T, i.e. cf k >= E."""
    return capacity_factor is not None and capacity_factor * top_k < num_experts


class OrtMoE(nn.Module):
    """The com.microsoft.MoE (or QMoE) node of one MoELayer; it exists only inside torch.onnx.export.

    Holds the op's inputs as buffers, already in the op's layout, so the ONNX file stores them as initializers.
    """

    def __init__(self, layer: MoELayer):
        super().__init__()
        reason = ort_unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"OrtMoE: {reason}")
        router = layer.router
        self.top_k = router.top_k
        self.unweighted = layer.combine == "unweighted"
        self.normalize = router.normalize  # gate = p / sum of the k chosen p; else p itself (switch, no normalize)
        self.activation = "swiglu" if layer.gated else _PLAIN_ACTIVATIONS[layer.activation]
        fc1_weight, fc1_bias = layer.up_weight, layer.up_bias
        if layer.gated:  # rows [gate_0, up_0, gate_1, up_1, ...]
            fc1_weight = torch.stack([layer.gate_weight, layer.up_weight], dim=2).flatten(1, 2)
            if layer.up_bias is not None or layer.gate_bias is not None:
                zeros = layer.up_weight.new_zeros(layer.up_weight.shape[:2])
                gate_bias = zeros if layer.gate_bias is None else layer.gate_bias
                up_bias = zeros if layer.up_bias is None else layer.up_bias
                fc1_bias = torch.stack([gate_bias, up_bias], dim=2).flatten(1, 2)
        self.block_size = None if layer.expert_weight_bits is None else layer.expert_weight_bits[1]
        weights = {"fc1": fc1_weight, "fc2": layer.down_weight}
        for name, weight in weights.items():
            if self.block_size is None:
                self.register_buffer(f"{name}_weight", weight.detach().clone())
                self.register_buffer(f"{name}_scales", None)
            else:
                q, scales = quantize_blocks(weight, 4, self.block_size)  # the grid's integers again (idempotent)
                nibbles = (q + 8).to(torch.uint8)
                self.register_buffer(f"{name}_weight", nibbles[..., 0::2] | (nibbles[..., 1::2] << 4))
                self.register_buffer(f"{name}_scales", scales)
        for name, value in (("router_weight", router.weight), ("fc1_bias", fc1_bias), ("fc2_bias", layer.down_bias),
                            ("output_bias", layer.output_bias)):
            self.register_buffer(name, None if value is None else value.detach().clone())
        self.shared = copy.deepcopy(layer.shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            raise RuntimeError("OrtMoE is an ONNX node and computes nothing in eager PyTorch; it only exists in the "
                               "copy that moe_compile.export lowers. Run the MoELayer it was built from instead.")
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat, self.router_weight)
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = top_k(probs, self.top_k)
        is_chosen = (chosen.unsqueeze(-1) == torch.arange(logits.shape[-1], device=x.device)).any(1)  # [T, E]
        scores = torch.zeros_like(logits) if self.unweighted else logits  # unweighted: equal logits, gates 1/k
        masked = scores.masked_fill(~is_chosen, float("-inf"))
        attrs = {"k": self.top_k, "normalize_routing_weights": 1, "activation_type": self.activation}
        if self.activation == "swiglu":
            attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
        if self.block_size is None:
            op, inputs = "MoE", (flat, masked, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        else:
            op = "QMoE"
            inputs = (flat, masked, self.fc1_weight, self.fc1_scales, self.fc1_bias, self.fc2_weight,
                      self.fc2_scales, self.fc2_bias)
            attrs.update(expert_weight_bits=4, block_size=self.block_size, weights_prepacked=0, accuracy_level=0)
        y = torch.onnx.ops.symbolic(f"com.microsoft::{op}", inputs, attrs, dtype=x.dtype, shape=flat.shape,
                                    version=1)
        if self.unweighted:
            y = y * self.top_k
        elif not self.normalize:
            y = y * probs.gather(1, chosen).sum(1, keepdim=True).to(y.dtype)
        if self.output_bias is not None:
            y = y + self.output_bias
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(x.shape)
