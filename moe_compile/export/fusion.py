"""Fused attention for the `ort` target: op-by-op attention subgraphs -> one com.microsoft.MultiHeadAttention.

What the dynamo exporter writes for `F.scaled_dot_product_attention` (torchlib's decomposition), per layer:

    q4 = Transpose(Reshape(q, [B, S, H, Dh]))                 the same for k4, v4 (after RoPE for LLaMA, and
    kT = Reshape(Transpose(Reshape(k4, 3-D), [0,2,1]), 4-D)    after repeat_kv's Expand/Reshape for GQA models)
    w  = Softmax(MatMul(q4 * s, kT * s) + bias)               s = Dh**-1/4; bias = Where(mask, 0, finfo.min)
    w  = Where(IsNaN(w), 0, w)
    y  = Reshape(Transpose(MatMul(w, v4)), [B*S, D])          2-D, because Linear/Conv1D export as Reshape -> Gemm

`fuse_attention` rewrites that into

    y  = Reshape(MultiHeadAttention(q, k, v, attention_bias=bias, num_heads=H, scale=...), [B*S, D])

in two steps, both onnxscript rewrite rules: onnxscript's own SDPA rule (`ort_fusions.sdpa`) finds the
attention core (query, key, value, additive mask, the product of the scales) and replaces it with a temporary
`ai.onnxruntime._fusion.SDPA` node; then each SDPA becomes MultiHeadAttention, by

  - `_MHA2D`, onnxscript's MultiHeadAttention rule (`ort_fusions.mha`, no past, no rotary, self-attention) with
    one fix: onnxscript assumes that the Reshape after the head transpose yields [B, S, D] and drops it, so
    where it yields [B*S, D] (our exports: the output projection is a Gemm) the Gemm was fed rank 3 and ORT
    refused the graph. `_MHA2D` keeps that Reshape (same target shape) after the fused node. The inputs are
    the [B, S, D] tensors before the head reshapes, so no transposes remain (GPT-2 and models like it);
  - where that pattern does not hold (LLaMA and other rotary models: RoPE sits between the head transpose and
    the SDPA; GQA models: K/V are repeated to H heads), onnxscript's `sdpa_via_mha` rule, which feeds the
    4-D tensors to MultiHeadAttention through Transpose/Reshape to [B, S, D] and back. The rotary ops and the
    K/V repetition stay standard ops.

The mask is passed through unchanged as attention_bias ([B or 1, 1, S, S], broadcast over heads), so the fused
graph computes what the exported one did, causal and padding mask included, for any batch and sequence length
(checked against eager in tests/export/test_fusion.py). The rewrites need static head counts and shapes of
known rank; `fuse_attention` runs ONNX shape inference first (value_info is added, nothing else changes).

Left alone: every node outside the matched attention subgraphs, in particular the MoE layers (com.microsoft.MoE
nodes and portable MoE subgraphs), the mask computation, the projections and RoPE. A graph with no match is
returned unchanged (count 0); so is one where a temporary SDPA node could not be lowered to MultiHeadAttention
(never a half-fused graph). Only for ONNX Runtime: the `portable` target must not call this (com.microsoft ops).

Numerics: the fused kernel sums in a different order (max abs difference to the unfused graph ~1e-6 fp32). One
difference by design: torchlib's Where(IsNaN(w), 0, w) guard is dropped; it only fires for a row whose scores
are all -inf, which our masks (finfo.min, not -inf) never produce; a fully masked row (a left-padding query)
attends uniformly in both the unfused and the fused graph.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import _rules as sdpa_via_mha_rules

FUSED_OP = "MultiHeadAttention"
FUSED_DOMAIN = "com.microsoft"
_SDPA_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's temporary SDPA node


class _MHA2D(MultiHeadAttention):
    """onnxscript's MultiHeadAttention rule, keeping the output Reshape when it does not give [B, S, D]."""

    def check(self, context, attention_reshaped=None, **bindings) -> pattern.MatchResult:
        result = super().check(context, **bindings)
        if result and (attention_reshaped is None or attention_reshaped.shape is None):
            return result.fail("the shape of the attention output is unknown", attention_reshaped)
        return result

    def rewrite(self, op, attention_reshaped=None, query_BSD=None, **bindings):
        output = super().rewrite(op, query_BSD=query_BSD, **bindings)
        if output is None:
            return None
        reshape = attention_reshaped.producer()
        if attention_reshaped.shape.rank() == 3 and attention_reshaped.shape[:2] == query_BSD.shape[:2]:
            return output  # already [B, S, D], what onnxscript's rule assumes
        allowzero = reshape.attributes.get_int("allowzero", 0)
        return op.Reshape(output, reshape.inputs[1], allowzero=allowzero)


_MHA_RULES = pattern.RewriteRuleSet(
    [_MHA2D.rule("MHA2D", is_rotary=False, has_past_present=False, is_cross_attention=False)])


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with each attention subgraph replaced by one com.microsoft.MultiHeadAttention node, and how many
    were fused (0: `model` itself, unchanged). The input proto is not modified."""
    ir_model = ir.from_proto(model)
    before = _count_fused(ir_model)
    common_passes.ShapeInferencePass()(ir_model)
    if sdpa_rules.apply_to_model(ir_model) == 0:
        return model, 0
    common_passes.RemoveUnusedNodesPass()(ir_model)  # the key's old Shape ops would block the MHA rule
    common_passes.ShapeInferencePass()(ir_model)  # shapes of the SDPA outputs, for the MHA rules' checks
    _MHA_RULES.apply_to_model(ir_model)
    sdpa_via_mha_rules.apply_to_model(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    if any(node.domain == _SDPA_DOMAIN for node in ir_model.graph.all_nodes()):  # not a valid graph: keep the export
        return model, 0
    ir_model.opset_imports.setdefault(FUSED_DOMAIN, 1)
    return ir.to_proto(ir_model), _count_fused(ir_model) - before


def _count_fused(ir_model: ir.Model) -> int:
    return sum(node.op_type == FUSED_OP and node.domain == FUSED_DOMAIN for node in ir_model.graph.all_nodes())
