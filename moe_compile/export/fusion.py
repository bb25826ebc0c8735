"""Fused attention for the `ort` target: op-by-op attention subgraphs -> one ONNX Runtime attention node each.

What the dynamo exporter writes for `F.scaled_dot_product_attention` (torchlib's decomposition), per layer:

    q4 = Transpose(Reshape(q, [B, S, H, Dh]))                 the same for k4, v4 (after RoPE for LLaMA, and
    kT = Reshape(Transpose(Reshape(k4, 3-D), [0,2,1]), 4-D)    after repeat_kv's Expand/Reshape for GQA models)
    w  = Softmax(MatMul(q4 * s, kT * s) + bias)               s = Dh**-1/4; bias = Where(mask, 0, finfo.min)
    w  = Where(IsNaN(w), 0, w)
    y  = Reshape(Transpose(MatMul(w, v4)), [B*S, D])          2-D, because Linear/Conv1D export as Reshape -> Gemm

`fuse_attention` rewrites that into, where the mask is causal (every causal LM; see below)

    y  = Reshape(GroupQueryAttention(q, k, v, seqlens_k=S-1, total_sequence_length=S, attention_bias=bias,
                                     num_heads=H, kv_num_heads=H, causal=1, scale=...), [B*S, D])

and otherwise into

    y  = Reshape(MultiHeadAttention(q, k, v, attention_bias=bias, num_heads=H, scale=...), [B*S, D])

(both com.microsoft). In a decoder with a KV cache (export task="text-generation"), where the keys are
Concat(past, new) and the mask is causal over past and new keys, the attention and the cache update become one
GroupQueryAttention(q, k_new, v_new, past_key, past_value, ...) that also writes the present (`_PastGQA`, step 1b).
The steps, all onnxscript rewrite rules:

  1. onnxscript's SDPA rule (`ort_fusions.sdpa`) finds the attention core (query, key, value, additive mask, the
     product of the scales) and replaces it with a temporary `ai.onnxruntime._fusion.SDPA` node.
  1b. `_PastGQA`: an SDPA over the cache (its keys and values Concat(past input, new), repeated to the query's
     heads or not) whose mask was probed causal becomes GroupQueryAttention with past and present, before step 2
     could turn it into MultiHeadAttention over the whole cache transposed at every step.
  2. Each SDPA becomes MultiHeadAttention, by `_MHA2D`: onnxscript's MultiHeadAttention rule (`ort_fusions.mha`,
     no past, no rotary, self-attention) with one fix. onnxscript assumes that the Reshape after the head
     transpose yields [B, S, D] and drops it; ours yields [B*S, D] (the output projection is a Gemm), so its
     Gemm was fed rank 3 and ORT refused the graph (what `optimize_for_ort` did). `_MHA2D` keeps that Reshape.
     Its inputs are the [B, S, D] tensors before the head reshapes: no transposes remain (GPT-2). Where that
     pattern does not hold (LLaMA: RoPE sits between the head transpose and the SDPA, and K/V are repeated to H
     heads), onnxscript's `sdpa_via_mha` rule feeds the 4-D tensors through Transpose/Reshape to [B, S, D] and
     back; RoPE and the K/V repetition stay standard ops.
  3. `_CausalGQA`: a MultiHeadAttention whose mask is causal becomes GroupQueryAttention with causal=1 and the
     same mask as attention_bias. ONNX Runtime's CPU kernel then skips the softmax of the keys after each query
     (MHA computes and masks them): one attention of GPT-2-small at 2048 tokens, 1 thread, 136 ms instead of 231
     (MHA; 374 unfused; ONNX-23 Attention 231-240; Intel Xeon). Causal is decided by `causal`: None (default)
     probes each mask, running the subgraph that computes it (standard ops on the input shapes, the
     attention_mask and past cache if the export takes them) at three small shapes with every integer input all
     ones (no padding: the least masking input) and requires every key after its query to be
     <= finfo(dtype).min / 2; True trusts the caller; False keeps MultiHeadAttention.

The mask goes in unchanged (broadcast over heads), so padding and sliding windows are kept; causal=1 only adds
what the probe saw the mask already do. The rewrites need static head counts and shapes of known rank:
`fuse_attention` runs ONNX shape inference first (value_info is added, nothing else changes).

Left alone: every node outside the matched attention subgraphs, in particular the MoE layers (com.microsoft.MoE
nodes and portable MoE subgraphs), the mask computation, the projections and RoPE. A graph with no match is
returned unchanged (count 0); so is one where a temporary SDPA node could not be lowered (never a half-fused
graph). Attention without a mask (bidirectional), cross-attention and a mask the probe does not find causal
stay MultiHeadAttention (a decoder's too: over the cache transposed, as before). Only for ONNX Runtime: the
`portable` target must not call this (com.microsoft ops).

Numerics: the fused kernels sum in another order (max abs difference to the unfused graph ~1e-6 fp32).
torchlib's Where(IsNaN(w), 0, w) guard is dropped: it fires only for a row whose scores are all -inf, which
finfo.min masks never produce. A fully masked row (a left-padding query) attends uniformly to all keys in the
unfused graph and in MultiHeadAttention, to the keys up to itself in GroupQueryAttention: outputs at padding
positions differ (they are meaningless in eager too); every other position is the same.
"""

from __future__ import annotations

import logging
from typing import Optional

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import _rules as sdpa_via_mha_rules

FUSED_OP = "MultiHeadAttention"
FUSED_DOMAIN = "com.microsoft"
GQA_OP = "GroupQueryAttention"
_log = logging.getLogger(__name__)
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


class _CausalGQA(pattern.RewriteRuleClassBase):
    """MultiHeadAttention(q, k, v, attention_bias=mask) -> GroupQueryAttention(causal=1, attention_bias=mask) with
    kv_num_heads = num_heads, for self-attention (same sequence axis for q and k, no past) whose masks were
    probed causal (`_causal_masks`): causal=1 lets ONNX Runtime's CPU kernel skip the keys after each query."""

    def __init__(self, causal_masks: set[str]):
        super().__init__("CausalGQA")
        self._causal_masks = causal_masks

    def pattern(self, op, query, key, value, mask, num_heads):
        return op.MultiHeadAttention(query, key, value, None, None, mask, num_heads=num_heads,
                                     scale=pattern.AttrVar("scale", can_match_none=True), _domain=FUSED_DOMAIN)

    def check(self, context, query, key, value, mask, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        source = mask.producer()  # sdpa_via_mha broadcasts the mask with an Expand, which changes no value
        if source is not None and source.op_type == "Expand" and source.domain == "":
            source = source.inputs[0]
        else:
            source = mask
        if mask.name not in self._causal_masks and source.name not in self._causal_masks:
            return result.fail("the mask was not probed causal", mask)
        shapes = [v.shape for v in (query, key, value)]
        if any(shape is None or shape.rank() != 3 for shape in shapes):
            return result.fail("query, key and value are not all [B, S, D]", query)
        if not shapes[0][1] == shapes[1][1] == shapes[2][1]:  # self-attention of one chunk, no past
            return result.fail("the query and key sequence axes differ", key)
        return result

    def rewrite(self, op, query, key, value, mask, num_heads, scale=None, **_):
        batch = op.Shape(query, start=0, end=1)
        seq = op.Shape(query, start=1, end=2)
        seqlens_k = op.Cast(op.Expand(op.Sub(seq, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(seq), to=ir.DataType.INT32)
        attributes = {"scale": scale.value} if scale is not None else {}
        output, _, _ = op.GroupQueryAttention(query, key, value, None, None, seqlens_k, total, None, None, None, mask,
                                              num_heads=num_heads.value, kv_num_heads=num_heads.value, causal=1,
                                              _domain=FUSED_DOMAIN, _outputs=3, **attributes)
        return output


class _PastGQA(pattern.RewriteRuleClassBase):
    """The attention of a decoder with a KV cache -> GroupQueryAttention with past and present:

        present_k = Concat(past_k, k_new, axis=-2)     the same for values; the graph's present outputs
        key = present_k, or its heads repeated to the query's: Reshape(Expand(Unsqueeze(present_k, [2])))
        SDPA(q, key, value, mask)  ->  GQA(q, k_new, v_new, past_k, past_v, seqlens_k = p + s - 1,
                                           total_sequence_length = p + s, attention_bias = mask) -> out, present

    q, k_new and v_new go in as [B, S, heads * Dh] (a transpose of the new tokens only), the cache as it is: the
    op reads past_k in place and writes the present itself, where MultiHeadAttention needed the whole (repeated)
    cache transposed to [B, T, D] at every step. Head h reads kv head h // (H / H_kv) in both. The op masks the keys
    after each query (query i of s sees the p + i + 1 first keys), so the rule takes only masks probed to do that
    already (`_causal_masks`, which sees the past)."""

    def __init__(self, causal_masks: set[str], repeated: bool):
        super().__init__("PastGQA" + "Repeated" * repeated)
        self._causal_masks = causal_masks
        self._repeated = repeated  # one rule each: onnxscript matches an OrValue inside a multi-output pattern badly

    def pattern(self, op, query, past_key, new_key, past_value, new_value, mask):
        present_key = op.Concat(past_key, new_key, axis=-2, _outputs=["present_key"])
        present_value = op.Concat(past_value, new_value, axis=-2, _outputs=["present_value"])
        key, value = present_key, present_value
        if self._repeated:
            key, value = (op.Reshape(op.Expand(op.Unsqueeze(x, pattern.ANY_VALUE, _outputs=[name]), pattern.ANY_VALUE),
                                     pattern.ANY_VALUE)
                          for x, name in ((key, "key_heads"), (value, "value_heads")))
        attention = op.SDPA(query, key, value, mask, key_format="BHSd", _domain=_SDPA_DOMAIN, _outputs=["attention"])
        return attention, present_key, present_value

    def check(self, context, query, past_key, new_key, past_value, new_value, mask, key_heads=None,
              value_heads=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not (past_key.is_graph_input() and past_value.is_graph_input()):
            return result.fail("the past keys and values are not inputs of the graph", past_key)
        if mask.name not in self._causal_masks:
            return result.fail("the mask was not probed causal", mask)
        shapes = [v.shape for v in (query, past_key, new_key, past_value, new_value)]
        if any(shape is None or shape.rank() != 4 for shape in shapes):
            return result.fail("query, keys and values are not all [B, heads, S, Dh]", query)
        heads, kv_heads, head_dim = shapes[0][1], shapes[1][1], shapes[0][3]
        if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim)) or heads % kv_heads:
            return result.fail("head counts unknown, or the query's not a multiple of the cache's", query)
        if key_heads is None and heads != kv_heads:
            return result.fail("the query has more heads than the cache, which is not repeated", query)
        for repeat in filter(None, (key_heads, value_heads)):
            axes = ir.convenience.get_const_tensor(repeat.producer().inputs[1])
            if axes is None or axes.numpy().tolist() not in ([2], [-3]):  # h reads kv head h // group
                return result.fail("the kv heads are repeated in another order", repeat)
        self._heads, self._kv_heads, self._head_dim = heads, kv_heads, head_dim
        return result

    def rewrite(self, op, query, past_key, new_key, past_value, new_value, mask, attention, **_):
        scale = attention.producer().attributes.get("scale")
        to_bsd = op.Constant(value_ints=[0, 0, -1])
        q, k, v = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), to_bsd) for x in (query, new_key, new_value))
        total = op.Add(op.Shape(past_key, start=2, end=3), op.Shape(query, start=2, end=3))
        seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(query, start=0, end=1)),
                            to=ir.DataType.INT32)
        attributes = {"scale": scale.value} if scale is not None else {}
        output, present_key, present_value = op.GroupQueryAttention(
            q, k, v, past_key, past_value, seqlens_k, op.Cast(op.Squeeze(total), to=ir.DataType.INT32), None, None,
            None, mask, num_heads=self._heads, kv_num_heads=self._kv_heads, _domain=FUSED_DOMAIN, _outputs=3,
            **attributes)
        heads = op.Reshape(output, op.Constant(value_ints=[0, 0, self._heads, self._head_dim]))
        return op.Transpose(heads, perm=[0, 2, 1, 3]), present_key, present_value


def fuse_attention(model: onnx.ModelProto, *, causal: Optional[bool] = None) -> tuple[onnx.ModelProto, int]:
    """`model` with each attention subgraph replaced by one fused node, and how many were fused (0: `model` itself,
    unchanged). The input proto is not modified.

    causal: None (default) probes each attention mask (`_causal_masks`) and lowers the attention whose mask is
    causal to GroupQueryAttention(causal=1), the rest to MultiHeadAttention; False: MultiHeadAttention only;
    True: every masked self-attention is causal (the caller knows it; no probe). A mask that a probe cannot run
    on its own (it depends on a custom-domain node, a control-flow op or an input of unknown inner dims) is not
    causal; why is logged at DEBUG level on this module's logger."""
    ir_model = ir.from_proto(model)
    before = _count_fused(ir_model)
    common_passes.ShapeInferencePass()(ir_model)
    if sdpa_rules.apply_to_model(ir_model) == 0:
        return model, 0
    common_passes.RemoveUnusedNodesPass()(ir_model)  # the key's old Shape ops would block the MHA rule
    masks = sorted({node.inputs[3].name for node in ir_model.graph.all_nodes()  # values of the export itself
                    if node.domain == _SDPA_DOMAIN and len(node.inputs) > 3 and node.inputs[3] is not None})
    causal_masks = set() if causal is False else set(masks) if causal else _causal_masks(model, masks)
    common_passes.ShapeInferencePass()(ir_model)  # shapes of the SDPA outputs, for the rules' checks
    if causal_masks:
        pattern.RewriteRuleSet([_PastGQA.rule(causal_masks, repeated) for repeated in (False, True)]).apply_to_model(
            ir_model)
    _MHA_RULES.apply_to_model(ir_model)
    sdpa_via_mha_rules.apply_to_model(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    if any(node.domain == _SDPA_DOMAIN for node in ir_model.graph.all_nodes()):  # not a valid graph: keep the export
        return model, 0
    if causal_masks:
        common_passes.ShapeInferencePass()(ir_model)
        pattern.RewriteRuleSet([_CausalGQA.rule(causal_masks)]).apply_to_model(ir_model)
        common_passes.RemoveUnusedNodesPass()(ir_model)
    ir_model.opset_imports.setdefault(FUSED_DOMAIN, 1)
    return ir.to_proto(ir_model), _count_fused(ir_model) - before


def _count_fused(ir_model: ir.Model) -> int:
    return sum(node.domain == FUSED_DOMAIN and node.op_type in (FUSED_OP, GQA_OP)
               for node in ir_model.graph.all_nodes())


PROBE_SHAPES = ((2, 7, 0), (1, 13, 5), (3, 1, 9))  # batch, sequence, past sequence (a decoder's cache)


def _causal_masks(model: onnx.ModelProto, masks: list[str]) -> set[str]:
    """The masks (additive attention biases [B or 1, H or 1, S, T], T = past + S keys) that mask every key after its
    query (key j of query i when j > T - S + i), probed: the subgraph computing them run in ONNX Runtime at
    PROBE_SHAPES, every integer input all ones (all tokens valid: the least masking attention_mask; ids and positions
    only feed shapes and position arithmetic) and every float input (a past cache) zeros. An input's dynamic axes
    are sized by their names (a decoder's batch, sequence, past_sequence, total_sequence; a window cache's
    past_window as past_sequence), else axes 0 and 1 are batch and sequence. A mask that is not [.., S, T], not
    <= finfo(dtype).min / 2 after the diagonal at every probe, or whose subgraph cannot be run alone, is not
    causal."""
    if not masks:
        return set()
    import numpy as np
    import onnxruntime as ort

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    needed, stack, seen = [], list(masks), set()
    while stack:  # the nodes the masks depend on
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        if node.op_type in ("If", "Loop", "Scan") or node.domain not in ("", "ai.onnx"):
            return set()
        needed.append(node)
        stack.extend(x for x in node.input if x)
    order = {id(node): i for i, node in enumerate(graph.node)}
    nodes = sorted({id(n): n for n in needed}.values(), key=lambda n: order[id(n)])
    inputs = [v for v in graph.input if v.name in seen or any(v.name in n.input for n in nodes)]
    used = {x for n in nodes for x in n.input}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    probe = onnx.helper.make_graph(nodes, "mask_probe", inputs,
                                   [onnx.helper.make_tensor_value_info(m, types.get(m) or onnx.TensorProto.FLOAT, None)
                                    for m in masks],
                                   [init for init in graph.initializer if init.name in used])
    probe_model = onnx.helper.make_model(probe, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        causal = set(masks)
        for batch, seq, past in PROBE_SHAPES:
            named = {"batch": batch, "sequence": seq, "past_sequence": past, "past_window": past,
                     "total_sequence": past + seq}
            feeds = {}
            for v in inputs:
                dims = [d.dim_value if d.dim_value > 0 else named.get(d.dim_param, (batch, seq)[i] if i < 2 else -1)
                        for i, d in enumerate(v.type.tensor_type.shape.dim)]
                if any(d < 0 for d in dims):
                    return set()
                dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                feeds[v.name] = (np.ones if np.issubdtype(dtype, np.integer) else np.zeros)(dims, dtype)
            for name, value in zip(masks, session.run(masks, feeds)):
                keys = value.shape[-1] if value.ndim == 4 else 0
                after = np.triu(np.ones((seq, keys), dtype=bool), keys - seq + 1)
                if (value.ndim != 4 or value.shape[-2] != seq or keys < seq
                        or not np.issubdtype(value.dtype, np.floating)
                        or not np.all(value[..., after] <= np.finfo(value.dtype).min / 2)):
                    causal.discard(name)
        return causal
    except Exception as error:  # a mask subgraph ONNX Runtime cannot run on its own: no claim
        _log.debug("mask probe failed: %s", error)
        return set()
