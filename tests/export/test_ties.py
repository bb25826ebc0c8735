"""Exact ties route the same way in eager PyTorch and in every export target (the lower index wins).

Two ways real inputs tie: repeated token ids in a family whose first FFN sees the embeddings directly (parallel
residual: GPT-NeoX, Phi, GPT-J give equal router scores to equal ids), and a router that cannot tell experts apart
(all-equal logits). Before the tie rule was written into the graph, expert choice on GPT-NeoX with repeated ids
differed from eager by 0.31 in the logits (portable), and the `ort` target's com.microsoft.MoE, which breaks ties
to the higher expert index, by 0.055 on all-equal logits. Every case also checks check_parity's routing
agreement: each routing choice the graph makes is the one eager makes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_compile
from moe_compile import MoEConfig
from moe_compile.export.trt_moe import TensorRTMoE
from moe_compile.moe import iter_moe_layers

from ..conftest import VOCAB
from .conftest import features, one_layer_moe

transformers = pytest.importorskip("transformers")

PARALLEL_RESIDUAL = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
}
ROUTINGS = {  # name -> (MoEConfig fields, targets that lower it natively)
    "expert_choice": (dict(routing="expert_choice", top_k=1), ["portable"]),
    "token_choice": (dict(routing="token_choice", top_k=2, combine="weighted"), ["portable", "ort"]),
    "token_choice_unweighted": (dict(routing="token_choice", top_k=2), ["portable", "ort"]),  # the split default
    "token_choice_capacity": (dict(routing="token_choice", top_k=2, capacity_factor=0.75, normalize=False),
                              ["portable"]),
    "switch": (dict(routing="switch", capacity_factor=1.0), ["portable"]),
    "switch_dropless": (dict(routing="switch", capacity_factor=4.0, combine="weighted"), ["portable", "ort"]),
}
CASES = [(routing, target) for routing, (_, targets) in ROUTINGS.items() for target in targets]
REPEATED = torch.tensor([[5, 5, 5, 7, 7, 5, 9, 9, 9, 9, 5, 5, 3, 3, 3, 3, 3, 5, 7, 7, 7]] * 2)


def _convert(dense, routing: str, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice's causality warning
        return moe_compile.convert(dense, MoEConfig(num_experts=4, experts="split", **ROUTINGS[routing][0], **fields),
                                   example_inputs=REPEATED[:, :8])


def _export_error(model, example, inputs, target: str, tmp_path) -> float:
    path = tmp_path / f"{target}.onnx"
    report = moe_compile.export(model, example, path, target=target, fallback=False)
    assert {layer.lowering for layer in report.layers} == {"com.microsoft.MoE" if target == "ort" else "portable"}
    parity = moe_compile.check_parity(model, path, inputs)
    assert parity.routing.selections == len(list(iter_moe_layers(model)))
    assert parity.routing.share == 1.0, parity.table()
    return max(out.max_abs for out in parity.outputs)


@pytest.mark.parametrize("routing, target", CASES)
def test_repeated_ids_in_parallel_residual_family(routing, target, tmp_path):
    config_class, model_class, fields = PARALLEL_RESIDUAL["phi"]  # tanh GELU: the ort target lowers it
    torch.manual_seed(0)
    dense = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, vocab_size=VOCAB)).eval()
    model = _convert(dense, routing)
    assert _export_error(model, (REPEATED[:, :8],), (REPEATED,), target, tmp_path) <= 1e-5


@pytest.mark.parametrize("family", ["gpt_neox", "gptj"])
def test_repeated_ids_expert_choice_other_families(family, tmp_path):
    config_class, model_class, fields = PARALLEL_RESIDUAL[family]
    torch.manual_seed(0)
    dense = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, vocab_size=VOCAB)).eval()
    model = _convert(dense, "expert_choice")
    assert _export_error(model, (REPEATED[:, :8],), (REPEATED,), "portable", tmp_path) <= 1e-5


def _all_equal_router(model):
    for _, layer in iter_moe_layers(model):
        torch.nn.init.zeros_(layer.router.weight)
    return model


@pytest.mark.parametrize("routing, target", CASES)
def test_all_equal_router_logits(routing, target, tmp_path):
    model = _all_equal_router(one_layer_moe(experts="split", **ROUTINGS[routing][0]))
    assert _export_error(model, (features((2, 8)),), (features((3, 13), seed=1),), target, tmp_path) <= 1e-5


@pytest.mark.parametrize("routing", ["token_choice", "switch_dropless"])
def test_all_equal_router_logits_tensorrt_lowering_in_eager(routing):
    """The tensorrt target's router ops and moe_ffn op, run in eager PyTorch (no TensorRT here), on ties."""
    model = _all_equal_router(one_layer_moe(experts="split", **ROUTINGS[routing][0]))
    (_, layer), = iter_moe_layers(model)
    x = features((3, 13), seed=1)
    with torch.no_grad():
        assert (TensorRTMoE(layer)(x) - layer(x)).abs().max() <= 1e-6


def test_routing_agreement_sees_a_tie_broken_the_other_way(tmp_path, monkeypatch):
    """A graph whose tie rule lets the higher index win, on identical experts: the logits cannot tell, the report's
    routing agreement does."""
    from moe_compile.moe.routers import token_choice

    def higher_index_wins(scores, k, ordered=True):  # top_k with the tie-breaking key reversed
        n = scores.shape[-1]
        rank = (scores.topk(k, dim=-1).values.unsqueeze(-2) > scores.unsqueeze(-1)).sum(-1)
        key = rank.float() * n + torch.arange(n - 1, -1, -1, dtype=torch.float32)
        return key.topk(k, dim=-1, largest=False).indices

    model = _all_equal_router(one_layer_moe(routing="token_choice", top_k=2))
    (_, layer), = iter_moe_layers(model)
    with torch.no_grad():
        for weight in (layer.up_weight, layer.up_bias, layer.down_weight, layer.down_bias):
            weight.copy_(weight[:1].expand_as(weight))
    with monkeypatch.context() as patch:
        patch.setattr(token_choice, "top_k", higher_index_wins)
        moe_compile.export(model, (features((2, 8)),), tmp_path / "m.onnx")
    parity = moe_compile.check_parity(model, tmp_path / "m.onnx", (features((3, 13), seed=1),))
    assert parity.passed
    assert parity.routing.choices == 3 * 13 * 2 and parity.routing.agreed == 0  # {3, 2} chosen, eager {0, 1}
    assert "0 of 78 routing choices" in parity.table()
