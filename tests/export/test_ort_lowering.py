"""The ort lowering layer by layer: each attribute mapping of com.microsoft.MoE against the eager MoELayer, and
the layers it must refuse (they fall back to the portable lowering)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import moe_compile
from moe_compile.export import TOLERANCES
from moe_compile.export.ort_moe import OrtMoE, ort_unsupported_reason
from moe_compile.export.trt_moe import tensorrt_unsupported_reason
from moe_compile.moe import iter_moe_layers

from ..passes.test_patterns import LearnedSwish, RMSNorm
from .conftest import features, one_layer_moe, to_moe, with_shared_expert

# (FFN, MoEConfig fields): every activation_type we emit, biases on and off, normalize on and off, unweighted
# (split experts) with k = 1, a power of two and not
SUPPORTED = [
    ({"activation": "relu"}, {"routing": "token_choice"}),
    ({"activation": "silu", "bias": False}, {"routing": "token_choice", "normalize": False}),
    ({"activation": "gelu_tanh"}, {"routing": "token_choice", "top_k": 3}),
    ({"activation": "silu", "gated": True}, {"routing": "token_choice"}),  # SwiGLU with biases, interleaved
    ({"activation": "silu", "gated": True, "bias": False}, {"routing": "switch", "capacity_factor": 4.0}),
    ({"activation": "relu"}, {"routing": "token_choice", "top_k": 1, "experts": "split"}),  # unweighted, shared bias
    ({"activation": "relu"}, {"routing": "token_choice", "top_k": 2, "experts": "split"}),
    ({"activation": "silu", "gated": True}, {"routing": "token_choice", "top_k": 3, "experts": "split"}),
]


@pytest.mark.parametrize("ffn, config", SUPPORTED)
def test_one_moe_node_matches_eager_layer(tmp_path, ffn, config):
    model = one_layer_moe(**ffn, **config)
    report = moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target="ort", fallback=False)
    assert [layer.lowering for layer in report.layers] == ["com.microsoft.MoE"]
    parity = moe_compile.check_parity(model, tmp_path / "m.onnx", features((3, 13), seed=1))
    assert parity.passed, parity.table()
    assert parity.outputs[0].max_abs <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("ffn, config, reason", [
    ({"activation": "gelu"}, {}, "erf GELU"),
    ({"activation": "gelu", "gated": True}, {}, "gated gelu"),
    ({}, {"routing": "switch"}, "capacity_factor=1.25 may drop"),
    ({}, {"routing": "token_choice", "capacity_factor": 1.0}, "capacity_factor=1.0 may drop"),
    ({}, {"routing": "expert_choice"}, "expert-choice"),
])
def test_layers_the_op_cannot_express(ffn, config, reason):
    (_, layer), = iter_moe_layers(one_layer_moe(**ffn, **config))
    assert reason in ort_unsupported_reason(layer)
    with pytest.raises(ValueError, match="OrtMoE"):
        OrtMoE(layer)


def test_dropless_capacity_is_expressible():
    (_, layer), = iter_moe_layers(one_layer_moe(routing="token_choice", capacity_factor=2.0))  # 2.0 * k=2 >= E=4
    assert ort_unsupported_reason(layer) is None


def test_ort_node_refuses_to_run_eagerly():
    (_, layer), = iter_moe_layers(one_layer_moe())
    with pytest.raises(RuntimeError, match="only exists in the copy"):
        OrtMoE(layer)(features((1, 4)))


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_shared_expert_is_exported(tmp_path, target):
    model = with_shared_expert(one_layer_moe(activation="silu", gated=True, experts="split", combine="weighted"))
    report = moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target=target, fallback=False)
    assert report.layers[0].lowering == ("com.microsoft.MoE" if target == "ort" else "portable")
    assert moe_compile.check_parity(model, tmp_path / "m.onnx", features((3, 13), seed=1)).passed


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_experts_with_the_models_own_modules_are_lowered_portably(tmp_path, target):
    """A learned activation and a hidden norm are the model's own modules, run by every expert: the fused nodes
    have no attribute for them, so the layer keeps the portable lowering, which exports them as they are."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), LearnedSwish(), RMSNorm(32), nn.Linear(32, 16)).eval()
    model = to_moe(dense)
    (_, layer), = iter_moe_layers(model)
    for reason in (ort_unsupported_reason(layer), tensorrt_unsupported_reason(layer)):
        assert "own activation LearnedSwish (learned) and hidden norm RMSNorm" in reason
    report = moe_compile.export(model, features((2, 8)), tmp_path / "m.onnx", target=target)
    assert report.layers[0].lowering == "portable"
    assert moe_compile.check_parity(model, tmp_path / "m.onnx", features((3, 13), seed=1)).passed
