"""The portable lowering is traced once per distinct MoE layer structure and inlined at every layer: the file
holds standard ops only, no function, and computes what eager PyTorch computes."""

from __future__ import annotations

import onnx
import pytest
import torch

import moe_compile
from moe_compile.example_models import build_example
from moe_compile.export import layer_functions
from moe_compile.moe import iter_moe_layers

from ..conftest import VOCAB
from .conftest import CHECK_SHAPES, features, one_layer_moe, to_moe, token_ids


def three_layer_moe(**config) -> torch.nn.Module:
    return to_moe(build_example("nanogpt", n_layer=3, vocab_size=VOCAB), experts="split", **config)


def test_structure_key_separates_what_changes_the_graph():
    model = three_layer_moe()
    (_, first), (_, second), _ = iter_moe_layers(model)
    x = torch.zeros(2, 8, first.d_model)
    key = layer_functions.structure_key
    assert key(first, x) == key(second, x)  # other weights, same graph
    assert key(first, x) != key(first, x.half()) and key(first, x) != key(first, x[0])
    assert key(first, x) == key(first, x[:1]) and key(first, x, dynamic=False) != key(first, x[:1], dynamic=False)
    second.router.top_k = 1
    assert key(first, x) != key(second, x)


def test_one_trace_per_structure_and_parity_everywhere(monkeypatch, tmp_path):
    model = three_layer_moe(top_k=2)
    _, _, (_, last) = iter_moe_layers(model)
    last.router.top_k = 1  # the last layer computes another graph
    traced = []
    export_function = layer_functions._export_function
    monkeypatch.setattr(layer_functions, "_export_function",
                        lambda layer, *args: traced.append(layer) or export_function(layer, *args))
    moe_compile.export(model, token_ids((2, 8)), tmp_path / "m.onnx")
    assert len(traced) == 2

    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert not graph.functions
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert {entry.domain for entry in graph.opset_import} <= {"", "ai.onnx"}
    for seed, shape in enumerate(CHECK_SHAPES):
        report = moe_compile.check_parity(model, tmp_path / "m.onnx", token_ids(shape, seed))
        assert report.passed, report.table()


class TwoLengths(torch.nn.Module):
    """Two MoE layers of one structure that see different sequence lengths (as an encoder and a decoder may)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = one_layer_moe(seed=1), one_layer_moe(seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x[:, :3])], dim=1)


class OneLayerTwice(torch.nn.Module):
    """One MoE layer called on two sequence lengths (it is traced where it stands)."""

    def __init__(self):
        super().__init__()
        self.ffn = one_layer_moe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ffn(x), self.ffn(x[:, :3])], dim=1)


@pytest.mark.parametrize("model_class", [TwoLengths, OneLayerTwice])
def test_a_static_graph_takes_each_layer_input_shape(tmp_path, model_class):
    model = model_class().eval()
    x = features((2, 8))
    moe_compile.export(model, x, tmp_path / "m.onnx", dynamic=False)
    report = moe_compile.check_parity(model, tmp_path / "m.onnx", x)
    assert report.passed, report.table()
