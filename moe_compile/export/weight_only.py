"""Weight-only b-bit experts in the exported graph (the layers `moe_compile.quantize_experts` rounded).

The portable lowering reads expert e's matrix W_e [out, in] (a constant slice of the layer's stack) in
Gemm(x, W_e, bias, transB=1). Each such Gemm becomes

    MatMul(x, DequantizeLinear(q_e^T [in, out] int4 | int8, s_e^T [in / B, out], axis=0, block_size=B)) (+ bias)

standard ONNX (opset 21: blocked quantization, int4), which ONNX Runtime fuses into one MatMulNBits. The integers
are those of quantize_blocks on the layer's dequantised weights, so the graph computes the eager layer's weights
(weights that left their grid since quantize_experts are refused).
ONNX Runtime computes MatMulNBits with int8-quantised activations unless the session sets
`session.qdq_matmulnbits_accuracy_level` to 0 (`exact_options`: our parity checks, runner and timings do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch

from ..errors import LoweringError
from ..moe.quantize import QUANTIZED_MATRICES, dequantize_blocks, quantize_blocks

OPSET = 21


def exact_options(options=None):
    """ONNX Runtime SessionOptions (new, or `options`) that compute MatMulNBits in float32 on the dequantised
    weights, as eager does, instead of on int8-quantised activations (ONNX Runtime's default)."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options


@dataclass
class ExpertMatrix:
    layer: str
    name: str  # layer.matrix.expert
    q: torch.Tensor  # [out, in] int8, the integers of its b-bit grid
    scales: torch.Tensor  # [out, in / B]
    bits: int
    block_size: int


def expert_matrices(layers: list) -> dict[tuple, ExpertMatrix]:
    """The rounded expert matrices of the (name, MoELayer) pairs, keyed by their values (shape and bytes): the
    lowering may fold a slice into an initializer of its own, so a Gemm's weight is recognised by what it holds.
    Raises LoweringError for a matrix that left its grid after quantize_experts."""
    matrices = {}
    for name, layer in layers:
        if layer.expert_weight_bits is None:
            continue
        bits, block_size = layer.expert_weight_bits
        for matrix in QUANTIZED_MATRICES:
            for e, weight in enumerate(getattr(layer, matrix) if getattr(layer, matrix) is not None else []):
                weight = weight.detach().float().cpu().contiguous()
                q, scales = quantize_blocks(weight, bits, block_size)
                if (dequantize_blocks(q, scales) - weight).abs().max() > 1e-6 * weight.abs().max():
                    raise LoweringError(
                        f"export: expert matrix {name}.{matrix}[{e}] is not on its int{bits} grid: its weights "
                        "changed after quantize_experts (training, healing, loading other weights). Call "
                        "moe_compile.quantize_experts(model, ...) again before exporting.")
                matrices[_key(weight.numpy())] = ExpertMatrix(name, f"{name}.{matrix}.{e}", q, scales, bits,
                                                              block_size)
    return matrices


def lower_quantized_experts(model: ir.Model, matrices: dict[tuple, ExpertMatrix]) -> int:
    """Rewrite every Gemm x W^T whose W is one of `matrices` as above; returns how many. Raises LoweringError when
    a matrix is read some other way (its weights would stay float32)."""
    graph, rewritten, written = model.graph, 0, set()
    for node in list(graph):
        weight = _constant_weight(node) if node.op_type == "Gemm" else None
        matrix = None if weight is None else matrices.get(_key(weight))
        if matrix is None:
            continue
        _check_gemm(node, matrix.name)
        _replace_gemm(graph, node, matrix)
        rewritten += 1
        written.add(matrix.name)
    missed = sorted({m.name for m in matrices.values()} - written)
    if missed:
        more = " ..." if len(missed) > 4 else ""
        raise LoweringError(f"export: the rounded expert matrices {', '.join(missed[:4])}{more} are not read by a "
                            "plain Gemm in the exported graph, so they cannot be written as b-bit weights.")
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return rewritten


def _key(array: np.ndarray) -> tuple:
    return array.shape, array.tobytes()


def _constant_weight(gemm: ir.Node) -> Optional[np.ndarray]:
    """The Gemm's B when it is constant: an initializer, or a constant Gather of one (a slice the folding left)."""
    value = gemm.inputs[1]
    constant = ir.convenience.get_const_tensor(value)
    if constant is not None:
        return constant.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Gather" or producer.attributes.get_int("axis", 0) != 0:
        return None
    data, index = (ir.convenience.get_const_tensor(v) for v in producer.inputs)
    if data is None or index is None or index.numpy().ndim != 0:
        return None
    return data.numpy()[int(index.numpy())]


def _check_gemm(node: ir.Node, name: str) -> None:
    attributes = node.attributes
    if (attributes.get_int("transA", 0), attributes.get_int("transB", 0), attributes.get_float("alpha", 1.0),
            attributes.get_float("beta", 1.0)) != (0, 1, 1.0, 1.0):
        raise LoweringError(f"export: expert matrix {name} feeds Gemm {node.name!r} with transA/transB/alpha/beta "
                            "other than x W^T; its weights cannot be written as b-bit integers.")


def _replace_gemm(graph: ir.Graph, gemm: ir.Node, matrix: ExpertMatrix) -> None:
    q, scales = matrix.q, matrix.scales
    integers = q.t().contiguous().numpy().astype(ml_dtypes.int4 if matrix.bits == 4 else np.int8)
    suffix = f"{len(graph.initializers)}"  # a matrix read twice (identical experts) gets two copies of its own
    q_value = ir.Value(name=f"{matrix.name}.{suffix}.q{matrix.bits}", const_value=ir.Tensor(integers))
    s_value = ir.Value(name=f"{matrix.name}.{suffix}.scale", const_value=ir.Tensor(scales.t().contiguous().numpy()))
    graph.register_initializer(q_value)
    graph.register_initializer(s_value)
    dequantize = ir.node("DequantizeLinear", [q_value, s_value], {"axis": 0, "block_size": matrix.block_size})
    matmul = ir.node("MatMul", [gemm.inputs[0], dequantize.outputs[0]])
    nodes = [dequantize, matmul]
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        nodes.append(ir.node("Add", [matmul.outputs[0], gemm.inputs[2]]))
    graph.insert_before(gemm, nodes)
    gemm.outputs[0].replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
