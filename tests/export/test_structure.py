"""The produced graphs: one com.microsoft.MoE node per layer where the op applies, standard ops only for
portable, a node count independent of the number of experts, no expert lost to a one-sided example input,
and the report and errors of each lowering."""

from __future__ import annotations

import onnx
import pytest
import torch

import moe_compile
from moe_compile import LoweringError
from moe_compile.moe import iter_moe_layers, routing_stats

from .conftest import MODELS, features, one_layer_moe, token_ids

ROUTINGS = ("token_choice", "switch", "expert_choice")


def op_types(graph) -> list[tuple[str, str]]:
    return [(node.domain, node.op_type) for node in graph.node]


@pytest.mark.parametrize("model_name", ["hf-gpt2", "hf-llama"])
def test_ort_has_one_moe_node_per_converted_layer(exported, model_name):
    exp = exported(model_name, "ort", routing="token_choice")
    layers = [name for name, _ in iter_moe_layers(exp.model)]
    assert len(layers) == 2
    assert op_types(exp.graph).count(("com.microsoft", "MoE")) == len(layers)
    assert [(layer.name, layer.lowering, layer.may_drop) for layer in exp.report.layers] == [
        (name, "com.microsoft.MoE", False) for name in layers]
    ops = [op for _, op in op_types(exp.graph)]
    assert ops.count("TopK") == 2 * len(layers)  # the tie rule's selection of each token's k experts (top_k)
    assert not {"ScatterND", "ScatterElements"} & set(ops)


def test_ort_falls_back_for_erf_gelu_and_says_so(exported):
    exp = exported("nanogpt", "ort", routing="token_choice")
    assert ("com.microsoft", "MoE") not in op_types(exp.graph)
    for layer in exp.report.layers:
        assert layer.lowering == "portable" and layer.capacity == "none (dropless)" and not layer.may_drop
        assert "fallback" in layer.reason and "erf GELU" in layer.reason
    assert "erf GELU" in exp.report.table() and exp.report.to_dict()["target"] == "ort"


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("model_name", MODELS)
def test_portable_uses_standard_ops_only(exported, model_name, routing):
    exp = exported(model_name, "portable", routing=routing)
    domains = {domain for domain, _ in op_types(exp.graph)}
    assert domains <= {"", "ai.onnx"}, domains
    assert not {"Loop", "If", "Scan"} & {op for _, op in op_types(exp.graph)}
    assert all(layer.lowering == "portable" for layer in exp.report.layers)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_portable_runs_each_expert_on_its_own_2d_weights(tmp_path, routing):
    """The sorted lowering: one sort (TopK) of the choices, one Gather of token rows, per expert two plain
    MatMuls (Gemm) against that expert's own 2-D initializers (which ONNX Runtime prepacks), no 3-D batched
    MatMul over padded buffers."""
    for experts in (2, 8):
        path = tmp_path / f"e{experts}.onnx"
        moe_compile.export(one_layer_moe(num_experts=experts, routing=routing), features((2, 8)), path)
        model = onnx.load(str(path))
        initializers = {init.name: len(init.dims) for init in model.graph.initializer}
        products = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm")]
        expert_products = [node for node in products if node.input[1] != "model.ffn.router.weight"]
        assert len(expert_products) == 2 * experts
        assert all(initializers.get(node.input[1]) == 2 for node in expert_products)
        # the selection (two TopKs: values, then the tie rule's keys) and the sort by expert; expert choice's
        # per-expert top-C is already in expert order
        assert [node.op_type for node in model.graph.node].count("TopK") == (2 if routing == "expert_choice" else 3)


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_experts_the_example_input_never_selects_are_exported(tmp_path, target):
    """The example routes every token to expert 0; inputs that reach all four experts still match eager."""
    model = one_layer_moe(routing="token_choice", top_k=1)
    (_, layer), = iter_moe_layers(model)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 16) * 10.0)  # logit e = 10 x_e: the largest of x_0..x_3 wins
    example = torch.zeros(2, 8, 16)
    example[..., 0] = 1.0
    model(example)
    assert routing_stats(model)["ffn"].tokens_per_expert.tolist() == [16, 0, 0, 0]
    moe_compile.export(model, example, tmp_path / "m.onnx", target=target)

    check = features((3, 20), seed=3)
    report = moe_compile.check_parity(model, tmp_path / "m.onnx", check)
    assert (routing_stats(model)["ffn"].tokens_per_expert > 0).all()
    assert report.passed, report.table()


def test_ort_strict_names_layer_reason_and_target(nanogpt):
    model = moe_compile.convert(nanogpt, moe_compile.MoEConfig(num_experts=4))
    with pytest.raises(LoweringError) as error:
        moe_compile.export(model, token_ids((2, 4)), "unused.onnx", target="ort", fallback=False)
    message = str(error.value)
    assert "'transformer.h.0.mlp'" in message and "erf GELU" in message and "target='portable'" in message


def test_unknown_target_lists_the_targets():
    with pytest.raises(LoweringError, match="unknown target 'openvino'.*portable, ort, tensorrt"):
        moe_compile.export(one_layer_moe(), features((1, 4)), "unused.onnx", target="openvino")


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": torch.bfloat16}, "Use torch.float32 or torch.float16"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_compile.export(one_layer_moe(), features((1, 4)), "unused.onnx", **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="inputs must be a tensor, a tuple of tensors or a dict of tensors"):
        moe_compile.export(one_layer_moe(), [[1, 2]], "unused.onnx")


@pytest.mark.parametrize("routing", ROUTINGS)
def test_a_size_one_example_gives_a_graph_for_any_size(tmp_path, routing):
    """torch.export bakes size-1 axes into the graph (an expert-choice graph exported at batch 1 indexes out of
    range at batch 2), so export widens a batch-1, sequence-1 example internally: only its shape matters."""
    model = one_layer_moe(routing=routing)
    moe_compile.export(model, features((1, 1)), tmp_path / "m.onnx")
    parity = moe_compile.check_parity(model, tmp_path / "m.onnx", features((3, 37), seed=5))
    assert parity.passed, parity.table()


def test_model_capacity_is_reported_as_dropping(tmp_path):
    model = one_layer_moe(routing="token_choice", capacity_factor=1.0)
    report = moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx")
    (layer,) = report.layers
    assert layer.capacity == "C = min(ceil(1.0*T*2/4), T)" and layer.may_drop
    assert "drops as in eager" in layer.reason and "yes" in report.table()


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("config", [{"routing": "token_choice", "top_k": 1}, {"routing": "token_choice"},
                                    {"routing": "token_choice", "top_k": 1, "capacity_factor": 1.0},
                                    {"routing": "switch"}, {"routing": "expert_choice", "top_k": 1}],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_skewed_routing_after_export_matches_eager(tmp_path, target, config):
    """Exported on a balanced example, run where every token's first choice is expert 2: one full segment,
    empty ones (and drops where the config has a capacity)."""
    model = one_layer_moe(**config)
    (_, layer), = iter_moe_layers(model)
    with torch.no_grad():  # logit e = 4 x_e: decisive, without probabilities so small that they tie at 0
        layer.router.weight.copy_(torch.eye(4, 16) * 4.0)
    moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target=target)
    skewed = features((3, 20), seed=5)
    skewed[..., 2] = skewed[..., 2].abs() + 3.0
    report = moe_compile.check_parity(model, tmp_path / "m.onnx", skewed)
    counts = routing_stats(model)["ffn"].tokens_per_expert.tolist()
    if config["routing"] != "expert_choice":  # (expert choice is balanced by construction)
        assert counts[2] == max(counts) and (0 in counts or config.get("top_k") != 1), counts
    assert report.passed, report.table()
