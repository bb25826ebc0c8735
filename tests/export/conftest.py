"""Fixtures for the export tests: converted tiny models and their ONNX exports, built once per session.

Experts are made to differ (upcycle noise) and routers to decide (N(0, 0.5^2) weights instead of the near-zero
default), so that a wrong gate, a wrong expert or a dropped expert shows in the logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn

import moe_compile
from moe_compile import ExportReport, MoEConfig
from moe_compile.moe import iter_moe_layers

from ..conftest import VOCAB

MODELS = ("nanogpt", "hf-gpt2", "hf-llama")
EXPORT_SHAPE = (2, 8)
CHECK_SHAPES = ((3, 11), (1, 37))  # batch/sequence shapes other than the export's


@dataclass
class Exported:
    model: torch.nn.Module  # the converted eager model
    report: ExportReport
    path: Path
    graph: onnx.GraphProto


def token_ids(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def to_moe(dense: torch.nn.Module, **config) -> torch.nn.Module:
    """convert() with 4 distinct experts and decisive routers (config fields override)."""
    config = {"num_experts": 4, "upcycle_noise": 0.5, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert_choice's causality warning
        model = moe_compile.convert(dense, MoEConfig(**config))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in iter_moe_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="session")
def exported(dense_models, tmp_path_factory):
    """exported(model_name, target, dtype=None, **MoEConfig fields) -> Exported, cached."""
    cache: dict = {}

    def get(model_name: str, target: str, dtype=None, **config) -> Exported:
        key = (model_name, target, dtype, tuple(sorted(config.items())))
        if key not in cache:
            model = to_moe(dense_models[model_name], **config)
            path = tmp_path_factory.mktemp("onnx") / f"{model_name}-{target}.onnx"
            report = moe_compile.export(model, token_ids(EXPORT_SHAPE), path, target=target, dtype=dtype)
            cache[key] = Exported(model, report, path, onnx.load(str(path)).graph)
        return cache[key]

    return get


_ACTIVATION_MODULES = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
                       "silu": nn.SiLU}


class FFN(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated; d=16, d_ff=32."""

    def __init__(self, activation: str, gated: bool = False, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=bias)
        self.gate = nn.Linear(16, 32, bias=bias) if gated else None
        self.act = _ACTIVATION_MODULES[activation]()
        self.down = nn.Linear(32, 16, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)


class OneFFN(nn.Module):
    """A model that is one FFN: float inputs [batch, seq, 16] -> [batch, seq, 16]."""

    def __init__(self, activation: str = "gelu_tanh", gated: bool = False, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.ffn = FFN(activation, gated, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


def one_layer_moe(activation: str = "gelu_tanh", gated: bool = False, bias: bool = True, **config) -> nn.Module:
    """OneFFN converted by to_moe (4 distinct experts, decisive router unless config says otherwise)."""
    return to_moe(OneFFN(activation, gated, bias).eval(), **config)


def features(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, 16, generator=torch.Generator().manual_seed(seed))


def with_shared_expert(model: nn.Module) -> nn.Module:
    """`model` whose one MoE layer also has an always-on shared expert of width 8 (split experts with shared
    neurons), random but fixed."""
    from moe_compile.moe.shared import SharedExpert

    (_, layer), = iter_moe_layers(model)
    g = torch.Generator().manual_seed(11)
    d = layer.d_model
    layer.shared = SharedExpert(torch.randn(8, d, generator=g) * 0.3, None, torch.randn(d, 8, generator=g) * 0.3,
                                layer.activation,
                                gate_weight=torch.randn(8, d, generator=g) * 0.3 if layer.gated else None)
    return model
