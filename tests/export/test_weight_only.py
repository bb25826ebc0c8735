"""quantize_experts and its export: b-bit expert weights as blocked DequantizeLinear + MatMul, run by ONNX Runtime as
MatMulNBits, equal to the eager model with the dequantised weights; the rounding itself, its refusals and its
round trip through save / load."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch

import moe_compile
from moe_compile import LoweringError, MoECompileError, MoEConfig
from moe_compile.export.weight_only import exact_options
from moe_compile.moe import iter_moe_layers
from moe_compile.moe.quantize import dequantize_blocks, quantize_blocks

from ..conftest import logits_of, make_dense_model
from .conftest import token_ids

pytest.importorskip("transformers")
BLOCK = 16
SPLIT = dict(num_experts=4, top_k=2, experts="split")
UPCYCLE = dict(num_experts=4, top_k=2, experts="upcycle", upcycle_noise=0.5)


def converted(name: str, **fields):
    model = moe_compile.convert(make_dense_model(name), MoEConfig(**(fields or SPLIT)))
    with torch.no_grad():  # decisive routers, so that a wrong expert shows
        for _, layer in iter_moe_layers(model):
            layer.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


def quantized(name: str, bits: int = 4, **fields):
    return moe_compile.quantize_experts(converted(name, **fields), bits=bits, block_size=BLOCK)


def optimized_ops(path) -> collections.Counter:
    options = exact_options()
    options.optimized_model_filepath = str(path) + ".optimized.onnx"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("bits", [4, 8])
def test_rounding_is_blockwise_symmetric_and_idempotent(bits):
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    weight[2, :BLOCK] = 0  # an all-zero block stays zero
    q, scales = quantize_blocks(weight, bits, BLOCK)
    q_max = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scales.shape == (6, 64 // BLOCK) and q.abs().max() == q_max
    rounded = dequantize_blocks(q, scales)
    assert (rounded - weight).abs().le(scales.repeat_interleave(BLOCK, -1) / 2 + 1e-7).all()
    assert rounded[2, :BLOCK].eq(0).all()
    again, rescaled = quantize_blocks(rounded, bits, BLOCK)
    assert torch.equal(again, q) and torch.allclose(rescaled, scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family, bits, fields", [("hf-gpt2", 4, SPLIT), ("hf-llama", 4, SPLIT),
                                                  ("hf-llama", 8, UPCYCLE), ("nanogpt", 4, UPCYCLE)])
def test_export_runs_b_bit_experts_and_equals_the_rounded_eager_model(tmp_path, family, bits, fields):
    model = converted(family, **fields)
    ids = token_ids((3, 11), seed=1)
    float_logits = logits_of(model, ids)
    moe_compile.quantize_experts(model, bits=bits, block_size=BLOCK)
    assert not torch.allclose(logits_of(model, ids), float_logits, atol=1e-4)  # the rounding shows
    report = moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx")
    layers = list(iter_moe_layers(model))
    matrices = 3 if layers[0][1].gated else 2
    assert report.opset == 21 and report.quantized_matmuls == len(layers) * 4 * matrices, report.table()
    graph = onnx.load(tmp_path / "model.onnx").graph
    kinds = {init.data_type for init in graph.initializer if init.name.endswith(f".q{bits}")}
    assert kinds == {onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8}
    assert not any(init.name.endswith(("up_weight", "down_weight", "gate_weight")) for init in graph.initializer)
    assert optimized_ops(tmp_path / "model.onnx")["MatMulNBits"] == report.quantized_matmuls
    parity = moe_compile.check_parity(model, tmp_path / "model.onnx", ids)
    assert parity.passed and parity.outputs[0].max_abs <= 1e-5 and parity.routing.share == 1.0, parity.table()


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_generation_export_decodes_with_b_bit_experts(tmp_path, target):
    model = quantized("hf-llama")
    report = moe_compile.export(model, None, tmp_path, task="text-generation", target=target, fallback=False)
    assert report.quantized_matmuls == (2 * 4 * 3 if target == "portable" else 0)
    parity = moe_compile.check_generation(model, tmp_path, [[5, 5, 5, 9, 3, 3, 17], [7, 7, 1]], steps=8)
    assert parity.passed and parity.max_abs <= 1e-5 and parity.token_agreement == 1.0, parity.table()


@pytest.mark.parametrize("family, fields", [("hf-gpt2", SPLIT), ("hf-llama", SPLIT), ("hf-llama", UPCYCLE)])
def test_ort_target_lowers_int4_layers_to_qmoe_equal_to_the_rounded_eager_model(tmp_path, family, fields):
    model = quantized(family, **fields)
    report = moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx", target="ort", fallback=False)
    assert {layer.lowering for layer in report.layers} == {"com.microsoft.QMoE"} and report.quantized_matmuls == 0
    graph = onnx.load(tmp_path / "model.onnx").graph
    nodes = [node for node in graph.node if node.op_type == "QMoE"]
    assert len(nodes) == len(report.layers)
    weights = {init.name: init for init in graph.initializer}
    fc1 = weights[nodes[0].input[2]]
    assert fc1.data_type == onnx.TensorProto.UINT8 and fc1.dims[-1] == model.config.hidden_size // 2
    repeated = torch.tensor([[5] * 12, [7, 7, 7, 3, 3, 3, 9, 9, 9, 9, 1, 1]])  # tied router scores
    for ids in (token_ids((3, 11), seed=1), repeated):
        parity = moe_compile.check_parity(model, tmp_path / "model.onnx", ids)
        assert parity.passed and parity.outputs[0].max_abs <= 1e-5 and parity.routing.share == 1.0, parity.table()


def test_int8_layers_stay_portable_in_the_ort_target_and_tensorrt_refuses_b_bit_layers(tmp_path):
    model = quantized("hf-llama", bits=8)
    report = moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx", target="ort")
    assert {layer.lowering for layer in report.layers} == {"portable"}
    assert all("int8-quantised activations" in layer.reason for layer in report.layers)
    assert report.quantized_matmuls == 24
    with pytest.raises(LoweringError, match="int8 weights in blocks of 16; com.microsoft.QMoE's CPU kernel"):
        moe_compile.export(model, token_ids((2, 8)), tmp_path / "strict.onnx", target="ort", fallback=False)
    with pytest.raises(LoweringError, match="int8 weights, which moe_ffn does not take"):
        moe_compile.export(model, token_ids((2, 8)), tmp_path / "trt.onnx", target="tensorrt", fallback=False)


def test_weights_changed_after_rounding_are_refused(tmp_path):
    model = quantized("hf-gpt2")
    with torch.no_grad():
        next(layer for _, layer in iter_moe_layers(model)).down_weight.add_(1e-3)
    with pytest.raises(LoweringError, match="not on its int4 grid.*quantize_experts"):
        moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx")


def test_bad_settings_are_refused_by_name(tmp_path):
    with pytest.raises(MoECompileError, match="no MoE layers"):
        moe_compile.quantize_experts(make_dense_model("hf-gpt2"))
    model = moe_compile.convert(make_dense_model("hf-gpt2"), MoEConfig(**SPLIT))
    with pytest.raises(MoECompileError, match="bits=3"):
        moe_compile.quantize_experts(model, bits=3)
    with pytest.raises(MoECompileError, match="power of two"):
        moe_compile.quantize_experts(model, block_size=24)
    with pytest.raises(MoECompileError, match="not multiples of block_size=128"):
        moe_compile.quantize_experts(model, block_size=128)
    moe_compile.quantize_experts(model, block_size=BLOCK)
    with pytest.raises(MoECompileError, match="needs opset 21"):
        moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx", opset=18)
    with pytest.raises(MoECompileError, match="export in float32"):
        moe_compile.export(model, token_ids((2, 8)), tmp_path / "model.onnx", dtype=torch.float16)


def test_save_load_keeps_the_rounding(tmp_path):
    model = quantized("hf-gpt2")
    loaded = moe_compile.load(moe_compile.save(model, tmp_path / "saved"))
    assert [layer.expert_weight_bits for _, layer in iter_moe_layers(loaded)] == [(4, BLOCK)] * 2
    assert torch.equal(logits_of(loaded, token_ids((2, 9))), logits_of(model, token_ids((2, 9))))
    report = moe_compile.export(loaded, token_ids((2, 8)), tmp_path / "model.onnx")
    assert report.quantized_matmuls == 16
