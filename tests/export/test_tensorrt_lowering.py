"""The tensorrt lowering: one moe_compile::moe_ffn plugin node per MoE layer with TensorRT's attributes, fed by
standard router ops, and the whole graph checked end to end in ONNX Runtime with each plugin node replaced by an
equivalent standard-op subgraph (every expert on every token, masked by the routing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import moe_compile
from moe_compile.errors import LoweringError
from moe_compile.export.trt_moe import TensorRTMoE, tensorrt_unsupported_reason
from moe_compile.moe import iter_moe_layers

from .conftest import CHECK_SHAPES, features, one_layer_moe, token_ids, with_shared_expert

MODELS = {"nanogpt": "gelu", "hf-llama": "silu"}  # plain erf GELU; gated SwiGLU without biases


def plugin_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "moe_ffn"]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("model_name", MODELS)
def test_one_plugin_node_per_layer_with_its_attributes(exported, model_name):
    e = exported(model_name, "tensorrt")
    layers = dict(iter_moe_layers(e.model))
    assert [layer.lowering for layer in e.report.layers] == ["moe_compile::moe_ffn"] * len(layers) == \
           ["moe_compile::moe_ffn"] * 2
    nodes = plugin_nodes(e.graph)
    assert len(nodes) == len(layers)
    producers = {out: n for n in e.graph.node for out in n.output}
    initializers = {i.name for i in e.graph.initializer}
    for node in nodes:
        attrs = attributes(node)
        gated = model_name == "hf-llama"
        assert node.domain == "moe_compile"
        assert attrs == {"activation": MODELS[model_name].encode(), "gated": int(gated),
                         "plugin_namespace": b"moe_compile", "plugin_version": b"1"}
        assert len(node.input) == 7 and all(name in initializers for name in node.input[3:])
        cast = producers[node.input[1]]  # expert ids: TopK's INT64 indices cast to INT32
        assert cast.op_type == "Cast" and attributes(cast)["to"] == TensorProto.INT32
    # everything else is standard ONNX
    assert {n.domain for n in e.graph.node if n.op_type != "moe_ffn"} <= {"", "ai.onnx"}
    assert "TopK" in {n.op_type for n in e.graph.node}


def reference_subgraph(node: onnx.NodeProto, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Standard ops computing moe_ffn: y = sum_e (sum_i g_i [e_i = e]) FFN_e(x), every expert on every token."""
    x, ids, gates, w1, b1, w2, b2 = node.input
    attrs = attributes(node)
    num_experts = numpy_helper.to_array(next(i for i in graph.initializer if i.name == w1)).shape[0]
    p = node.name + "_ref_"
    nodes: list[onnx.NodeProto] = []
    constants = {"half": 0.5, "one": 1.0, "inv_sqrt2": 0.7071067811865476, "c": 0.7978845608028654, "a": 0.044715}

    def op(kind, *inputs, **kwargs):
        out = f"{p}{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [out], **kwargs))
        return out

    def const(name):  # a scalar in x's dtype
        value = helper.make_tensor(p + name, TensorProto.FLOAT, [], [constants[name]])
        return op("CastLike", op("Constant", value=value), x)

    def ints(*values):
        return op("Constant", value=helper.make_tensor(p + "i", TensorProto.INT64, [len(values)], list(values)))

    def activation(v):
        kind = attrs["activation"].decode()
        if kind == "relu":
            return op("Relu", v)
        if kind == "silu":
            return op("Mul", v, op("Sigmoid", v))
        if kind == "gelu":
            inner = op("Erf", op("Mul", v, const("inv_sqrt2")))
        else:
            cube = op("Mul", op("Mul", v, v), v)
            inner = op("Tanh", op("Mul", const("c"), op("Add", v, op("Mul", const("a"), cube))))
        return op("Mul", op("Mul", v, const("half")), op("Add", const("one"), inner))

    hidden = op("Add", op("MatMul", x, op("Transpose", w1, perm=[0, 2, 1])), op("Unsqueeze", b1, ints(1)))
    if attrs["gated"]:
        gate, up = f"{p}gate", f"{p}up"
        nodes.append(helper.make_node("Split", [hidden], [gate, up], axis=2, num_outputs=2))
        hidden = op("Mul", activation(gate), up)
    else:
        hidden = activation(hidden)
    out = op("Add", op("MatMul", hidden, op("Transpose", w2, perm=[0, 2, 1])), op("Unsqueeze", b2, ints(1)))  # [E,T,d]
    experts = op("Constant", value=numpy_helper.from_array(np.arange(num_experts, dtype=np.int64), p + "experts"))
    picked = op("CastLike", op("Equal", op("Unsqueeze", op("Cast", ids, to=TensorProto.INT64), ints(2)), experts), x)
    weight = op("ReduceSum", op("Mul", picked, op("Unsqueeze", gates, ints(2))), ints(1), keepdims=0)  # [T, E]
    weight = op("Unsqueeze", op("Transpose", weight, perm=[1, 0]), ints(2))  # [E, T, 1]
    nodes.append(helper.make_node("ReduceSum", [op("Mul", out, weight), ints(0)], list(node.output), keepdims=0))
    return nodes


def with_reference_nodes(path, out_path) -> int:
    """Write `path` with every moe_ffn node replaced by its reference subgraph; returns how many were replaced."""
    model = onnx.load(str(path))
    graph = model.graph
    new_nodes, replaced = [], 0
    for node in graph.node:
        if node.op_type == "moe_ffn":
            new_nodes += reference_subgraph(node, graph)
            replaced += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in model.opset_import if o.domain != "moe_compile"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return replaced


@pytest.mark.parametrize("model_name", MODELS)
def test_graph_around_the_plugin_matches_eager(exported, tmp_path, model_name):
    e = exported(model_name, "tensorrt")
    assert with_reference_nodes(e.path, tmp_path / "ref.onnx") == 2
    for shape in CHECK_SHAPES:
        parity = moe_compile.check_parity(e.model, tmp_path / "ref.onnx", token_ids(shape, seed=3))
        assert parity.passed, parity.table()


def test_reference_subgraph_can_fail(exported, tmp_path):
    """The check is not vacuous: a plugin node with the wrong activation attribute fails parity."""
    e = exported("nanogpt", "tensorrt")
    model = onnx.load(str(e.path))
    for node in plugin_nodes(model.graph):
        next(a for a in node.attribute if a.name == "activation").s = b"relu"
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    with_reference_nodes(tmp_path / "wrong.onnx", tmp_path / "ref.onnx")
    assert not moe_compile.check_parity(e.model, tmp_path / "ref.onnx", token_ids((2, 9))).passed


# every activation, gated and biasless, switch, unweighted split with its shared output bias, normalize off
VARIANTS = [
    ({"activation": "gelu"}, {}),
    ({"activation": "gelu", "gated": True, "bias": False}, {"routing": "token_choice", "normalize": False}),
    ({"activation": "gelu_tanh"}, {"routing": "switch", "capacity_factor": 4.0}),
    ({"activation": "relu", "bias": False}, {"top_k": 3}),
    ({"activation": "silu", "gated": True}, {"experts": "split", "top_k": 2}),
]


def assert_lowering_matches_eager(model, tmp_path):
    """TensorRTMoE equals the eager layer, and the exported graph (plugin nodes replaced by their reference) matches
    eager in ONNX Runtime at another shape."""
    (_, layer), = iter_moe_layers(model)
    x = features((3, 7), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(TensorRTMoE(layer)(x), layer(x), rtol=0, atol=1e-5)
    moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target="tensorrt", fallback=False)
    with_reference_nodes(tmp_path / "m.onnx", tmp_path / "ref.onnx")
    assert moe_compile.check_parity(model, tmp_path / "ref.onnx", features((3, 13), seed=1)).passed


@pytest.mark.parametrize("ffn, config", VARIANTS)
def test_lowered_module_equals_eager_layer(tmp_path, ffn, config):
    assert_lowering_matches_eager(one_layer_moe(**ffn, **config), tmp_path)


def test_layers_the_plugin_cannot_express(tmp_path):  # with fallback=True they keep the portable lowering
    model = one_layer_moe(routing="expert_choice")
    (_, layer), = iter_moe_layers(model)
    assert "expert-choice" in tensorrt_unsupported_reason(layer)
    with pytest.raises(LoweringError, match="cannot be lowered to moe_compile::moe_ffn"):
        moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target="tensorrt", fallback=False)
    (_, dropping), = iter_moe_layers(one_layer_moe(routing="switch"))
    assert "may drop" in tensorrt_unsupported_reason(dropping)


def test_bfloat16_export_for_tensorrt(tmp_path):
    model = one_layer_moe(activation="silu", gated=True)
    moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target="tensorrt", dtype=torch.bfloat16)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    (node,) = plugin_nodes(graph)
    fc1_weight = next(i for i in graph.initializer if i.name == node.input[3])
    assert fc1_weight.data_type == TensorProto.BFLOAT16
    with pytest.raises(ValueError, match="bfloat16 for target='tensorrt'"):
        moe_compile.export(model, features((2, 8)), tmp_path / "p.onnx", target="portable", dtype=torch.bfloat16)


def test_shared_expert_runs_beside_the_plugin(tmp_path):
    model = with_shared_expert(one_layer_moe(activation="silu", gated=True, experts="split", combine="weighted"))
    assert_lowering_matches_eager(model, tmp_path)
