"""ONNX Runtime (CPU) against eager PyTorch, for every routing x target x model, at shapes other than the export's."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_compile
from moe_compile.export import TOLERANCES

from .conftest import CHECK_SHAPES, MODELS, token_ids

ROUTINGS = ("token_choice", "switch", "expert_choice")

# whole models through the ort target: com.microsoft.MoE for GPT-2 (gelu_tanh) and LLaMA (SwiGLU), switch made
# dropless by capacity_factor * k >= E, split experts (unweighted) with a shared output bias; nanoGPT (erf GELU)
# falls back. The op's other attributes (relu, silu, normalize off, unweighted k = 1 and 3) are checked layer by
# layer in test_ort_lowering.py.
ORT_CASES = [
    ("hf-gpt2", {"routing": "token_choice"}),
    ("hf-llama", {"routing": "token_choice"}),
    ("hf-llama", {"routing": "switch", "capacity_factor": 4.0}),
    ("hf-gpt2", {"routing": "token_choice", "experts": "split"}),
    ("nanogpt", {"routing": "token_choice"}),
]


def assert_parity(exp, seed: int = 1):
    for i, shape in enumerate(CHECK_SHAPES):
        report = moe_compile.check_parity(exp.model, exp.path, token_ids(shape, seed + i))
        out = report.outputs[0]
        assert out.shape == (*shape, 128)
        assert report.passed, report.table()
        assert out.max_abs <= TOLERANCES[torch.float32]
        assert out.cosine > 0.9999 and out.top1 == 1.0, report.table()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("model_name", MODELS)
def test_portable_matches_eager(exported, model_name, routing):
    assert_parity(exported(model_name, "portable", routing=routing))


@pytest.mark.parametrize("model_name, config", ORT_CASES)
def test_ort_matches_eager(exported, model_name, config):
    assert_parity(exported(model_name, "ort", **config))


@pytest.mark.parametrize("model_name, target", [("hf-gpt2", "ort"), ("nanogpt", "portable")])
def test_fp16_export_within_fp16_tolerance(exported, model_name, target):
    exp = exported(model_name, target, dtype=torch.float16, routing="token_choice")
    assert exp.report.dtype == "float16"
    assert exp.graph.output[0].type.tensor_type.elem_type == 10  # FLOAT16
    report = moe_compile.check_parity(exp.model, exp.path, token_ids(CHECK_SHAPES[0]))
    assert report.dtype == "float16" and report.outputs[0].tolerance == TOLERANCES[torch.float16]
    assert report.passed, report.table()
    assert report.outputs[0].max_abs > 0  # really ran in fp16
    assert report.outputs[0].cosine > 0.9999


def test_parity_report_fails_on_a_different_model(exported):
    """The check can fail: the same ONNX file against a model whose first expert differs."""
    exp = exported("hf-gpt2", "ort", routing="token_choice")
    other = copy.deepcopy(exp.model)
    with torch.no_grad():
        other.transformer.h[0].mlp.down_weight[0].mul_(1.5)
    report = moe_compile.check_parity(other, exp.path, token_ids(CHECK_SHAPES[0]))
    assert not report.passed and "FAIL" in report.table()
    data = report.to_dict()
    assert data["passed"] is False and data["outputs"][0]["max_abs"] > TOLERANCES[torch.float32]


def test_parity_input_errors(exported, tmp_path):
    exp = exported("hf-gpt2", "ort", routing="token_choice")
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        moe_compile.check_parity(exp.model, tmp_path / "missing.onnx", token_ids((1, 4)))
    with pytest.raises(ValueError, match="takes 1 inputs"):
        moe_compile.check_parity(exp.model, exp.path, (token_ids((1, 4)), token_ids((1, 4))))


def test_bound_is_absolute_up_to_1_and_relative_beyond():
    """tolerance * max(1, max |b|): fp32 rounding on logits of magnitude 178 (a real 270M model's 4e-4) passes,
    an error the size of a wrong routing decision (0.3) fails at any scale, and small outputs keep the absolute 1e-4."""
    import numpy as np

    from moe_compile.export.parity import compare

    tolerance = TOLERANCES[torch.float32]
    large = np.linspace(-178, 178, 1000)
    assert compare("logits", large + 4e-4, large, tolerance).passed
    assert not compare("logits", large + 0.3, large, tolerance).passed
    small = np.linspace(-0.5, 0.5, 1000)
    assert compare("logits", small + 9e-5, small, tolerance).passed
    assert not compare("logits", small + 2e-4, small, tolerance).passed


def test_routing_agreement_of_a_file_with_external_weights(tmp_path):
    """The selections are read from a copy of the graph beside the file (where its weights' paths resolve), which
    is removed afterwards."""
    import onnx

    from .conftest import features, one_layer_moe

    model = one_layer_moe()
    moe_compile.export(model, (features((2, 8)),), tmp_path / "m.onnx")
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(onnx.load(tmp_path / "m.onnx"), folder / "m.onnx", save_as_external_data=True, location="m.onnx.data")
    report = moe_compile.check_parity(model, folder / "m.onnx", (features((3, 13), seed=1),))
    assert report.passed and report.routing.share == 1.0 and report.routing.choices == 3 * 13 * 2
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_dense_file_has_no_routing_to_compare(tmp_path):
    from .conftest import OneFFN, features

    dense = OneFFN("gelu_tanh", False, True).eval()
    moe_compile.export(dense, (features((2, 8)),), tmp_path / "d.onnx")
    report = moe_compile.check_parity(dense, tmp_path / "d.onnx", (features((3, 13), seed=1),))
    assert report.routing is None and "no MoE layer" in report.table()
