"""The custom op `moe_compile::moe_ffn`: one MoE FFN layer given its routing decision.

    y_t = sum_i g_{t,i} FFN_{e_{t,i}}(x_t)                                        (dropless, every choice kept)
    FFN_e(x) = W2[e] act(W1[e] x + b1[e]) + b2[e]                                 (gated = False)
    FFN_e(x) = W2[e] (act(W1g[e] x + b1g[e]) * (W1u[e] x + b1u[e])) + b2[e]       (gated = True, W1 = [W1g; W1u])

Operands, all tensors (a TensorRT plugin takes no optional inputs): x [T, d], expert_ids [T, k] (int32 or int64),
gates [T, k], fc1_weight [E, m or 2m, d], fc1_bias [E, m or 2m], fc2_weight [E, d, m], fc2_bias [E, d] (nn.Linear
layout, [out, in]); a layer without a bias passes zeros, an unweighted combine passes gates of ones. Attributes:
activation (gelu | gelu_tanh | relu | silu) and gated. The same name and operands are the ONNX node of the
`tensorrt` export target and the TensorRT plugin.

Implementations: any device, plain torch, the eager layer's sorted path (sort_by_expert + run_experts); CUDA, the
Triton grouped GEMM of triton_moe.py when Triton is installed. Backward (every device): the vector-Jacobian product
of the plain-torch path, recomputed from the saved operands (no activations are kept between forward and backward).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..moe.activations import ACTIVATIONS
from ..moe.dispatch import run_experts, sort_by_expert
from ..moe.ffn import DenseFFN

OP_NAME = "moe_compile::moe_ffn"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference_moe_ffn(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, fc1_weight: torch.Tensor,
                      fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, activation: str,
                      gated: bool) -> torch.Tensor:
    """The op in plain torch: each expert's DenseFFN on its contiguous rows of the sorted layout."""
    num_experts = fc1_weight.shape[0]
    dispatch = sort_by_expert(expert_ids.long(), gates, num_experts)
    width = fc2_weight.shape[2]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        up = slice(width, 2 * width) if gated else slice(0, width)
        ffn = DenseFFN(up_weight=fc1_weight[e, up], up_bias=fc1_bias[e, up], down_weight=fc2_weight[e],
                       down_bias=fc2_bias[e], activation=activation,
                       gate_weight=fc1_weight[e, :width] if gated else None,
                       gate_bias=fc1_bias[e, :width] if gated else None)
        return ffn(rows)

    return run_experts(x, dispatch, expert)[0]


@torch.library.custom_op(OP_NAME, mutates_args=())
def _moe_ffn(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, fc1_weight: torch.Tensor,
             fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, activation: str,
             gated: bool) -> torch.Tensor:
    return reference_moe_ffn(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gated)


@_moe_ffn.register_fake
def _(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gated):
    return x.new_empty(x.shape)


if HAS_TRITON:
    @_moe_ffn.register_kernel("cuda")
    def _(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gated):
        from .triton_moe import fused_moe  # Triton compiles on first use only

        return fused_moe(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gated)


def _setup_context(ctx, inputs, output):
    *tensors, ctx.activation, ctx.gated = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad):
    """The vector-Jacobian product of reference_moe_ffn, recomputed (expert_ids and attributes get no gradient)."""
    x, expert_ids, gates, *weights = ctx.saved_tensors
    leaves = [t.detach().requires_grad_() for t in (x, gates, *weights)]
    with torch.enable_grad():
        y = reference_moe_ffn(leaves[0], expert_ids, *leaves[1:], ctx.activation, ctx.gated)
        dx, dgates, *dweights = torch.autograd.grad(y, leaves, grad, allow_unused=True, materialize_grads=True)
    return dx, None, dgates, *dweights, None, None


_moe_ffn.register_autograd(_backward, setup_context=_setup_context)


def moe_ffn(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, fc1_weight: torch.Tensor,
            fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, activation: str,
            gated: bool) -> torch.Tensor:
    """torch.ops.moe_compile.moe_ffn after checking the operands (see the module docstring)."""
    problem = operand_problem(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gated)
    if problem:
        raise ValueError(f"moe_ffn: {problem}")
    return torch.ops.moe_compile.moe_ffn(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                         activation, gated)


def operand_problem(x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation: str,
                    gated: bool) -> Optional[str]:
    """What is wrong with the operands' shapes, dtypes or attributes, or None."""
    if activation not in ACTIVATIONS:
        return f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
    if x.dim() != 2 or expert_ids.dim() != 2 or gates.shape != expert_ids.shape or expert_ids.shape[0] != x.shape[0]:
        return (f"x must be [T, d] and expert_ids, gates [T, k]; got x {tuple(x.shape)}, expert_ids "
                f"{tuple(expert_ids.shape)}, gates {tuple(gates.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        return f"expert_ids must be int32 or int64, got {expert_ids.dtype}"
    if fc1_weight.dim() != 3 or fc2_weight.dim() != 3:
        return "fc1_weight and fc2_weight must be stacked nn.Linear weights [E, out, in]"
    num_experts, fc1_rows, d = fc1_weight.shape
    width = fc2_weight.shape[2]
    if (fc1_rows != (2 * width if gated else width) or d != x.shape[1]
            or tuple(fc2_weight.shape) != (num_experts, d, width)):
        want = f"[{num_experts}, {'2*' if gated else ''}m, {x.shape[1]}] and [{num_experts}, {x.shape[1]}, m]"
        return (f"expert weights fc1 {tuple(fc1_weight.shape)}, fc2 {tuple(fc2_weight.shape)} do not fit x "
                f"{tuple(x.shape)}{' (gated: fc1 = [gate; up] rows)' if gated else ''}; want {want} "
                "(nn.Linear layout [out, in], not transposed)")
    if tuple(fc1_bias.shape) != (num_experts, fc1_rows) or tuple(fc2_bias.shape) != (num_experts, d):
        return (f"biases must be [E, fc1 rows] = [{num_experts}, {fc1_rows}] and [E, d] = [{num_experts}, {d}] "
                f"(zeros for a layer without bias); got {tuple(fc1_bias.shape)}, {tuple(fc2_bias.shape)}")
    floats = {t.dtype for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)}
    if len(floats) != 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return ("x, weights and biases must share one dtype among float32, float16, bfloat16; "
                f"got {sorted(map(str, floats))}")
    return None


def layer_operands(layer) -> dict[str, torch.Tensor]:
    """fc1/fc2 weights and biases of an MoE layer (or ExpertWeights) in the op's layout: fc1 = [gate; up] rows
    when gated, zeros for absent biases. Autograd flows back to the layer's parameters."""
    fc1_weight = torch.cat([layer.gate_weight, layer.up_weight], 1) if layer.gate_weight is not None \
        else layer.up_weight
    num_experts, width = layer.up_weight.shape[:2]

    def bias(value: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        return layer.up_weight.new_zeros(num_experts, rows) if value is None else value

    fc1_bias = bias(layer.up_bias, width)
    if layer.gate_weight is not None:
        fc1_bias = torch.cat([bias(layer.gate_bias, width), fc1_bias], 1)
    return {"fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": layer.down_weight,
            "fc2_bias": bias(layer.down_bias, layer.down_weight.shape[1])}
