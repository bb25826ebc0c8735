"""Blocks torch.fx cannot trace, captured with torch.export on the arguments recorded from one forward: the
hand-written GPT whose block builds its causal mask at run time and applies its FFN inline with a functional
(or gated) activation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx

import moe_compile
from moe_compile import MoEConfig, MoELayer

from ..conftest import VOCAB, make_dense_model

MODELS = ("gpt-runtime-mask", "gpt-runtime-mask-gated")
EXACT = {"upcycle top-2": MoEConfig(num_experts=4, top_k=2), "split k=E": MoEConfig(num_experts=4, top_k=4,
                                                                                   experts="split")}
ROUTINGS = {"switch": MoEConfig(num_experts=4, routing="switch"),
            "token_choice": MoEConfig(num_experts=4, top_k=2, experts="split"),
            "expert_choice": MoEConfig(num_experts=4, top_k=2, routing="expert_choice", experts="split")}


def ids(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    return {name: make_dense_model(name) for name in MODELS}


@pytest.fixture(scope="module")
def converted(dense):
    """(model, config name) -> converted from a batch-1, sequence-1 example (only its shape and dtype matter)."""
    cache = {}

    def get(model_name, config_name):
        if (model_name, config_name) not in cache:
            config = {**EXACT, **ROUTINGS}[config_name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # expert_choice's causality warning
                cache[model_name, config_name] = moe_compile.convert(dense[model_name], config,
                                                                     example_inputs=ids((1, 1)))
        return cache[model_name, config_name]
    return get


@pytest.mark.parametrize("config_name", EXACT)
@pytest.mark.parametrize("model_name", MODELS)
def test_captured_blocks_convert_exactly(dense, converted, model_name, config_name):
    moe = converted(model_name, config_name)
    sites = moe.moe_report.converted
    assert [s.name for s in sites] == ["transformer.h.0:expand..shrink", "transformer.h.1:expand..shrink"]
    assert all("torch.export graph" in s.reason for s in sites)
    assert all(s.gated == (model_name.endswith("gated")) for s in sites)
    with torch.no_grad():  # another batch and sequence than the recorded call: the capture is dynamic
        error = (moe(ids((3, 37), seed=1)) - dense[model_name](ids((3, 37), seed=1))).abs().max().item()
    assert error <= 1e-5


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_routing_converts(converted, model_name, routing):
    moe = converted(model_name, routing)
    for block in moe.transformer.h:
        assert isinstance(block, fx.GraphModule) and type(block).__name__.endswith("RuntimeMaskBlock")
        assert sum(isinstance(m, MoELayer) for m in block.modules()) == 1
        assert not hasattr(block, "expand") and not hasattr(block, "shrink")  # the dense FFN's weights are gone
    assert moe(ids((2, 5))).shape == (2, 5, VOCAB)


def test_token_choice_stays_causal(converted):
    moe = converted("gpt-runtime-mask-gated", "token_choice")
    tokens = ids((2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
    with torch.no_grad():
        assert torch.equal(moe(tokens)[:, :8], moe(changed)[:, :8])
        assert not torch.equal(moe(tokens)[:, 8:], moe(changed)[:, 8:])


def test_captured_block_shares_parameters_trains_and_follows_train_mode():
    model = make_dense_model("gpt-runtime-mask-gated")
    model.transformer.h[0].drop.p = 0.5
    block_params = dict(model.transformer.h[0].named_parameters())
    moe = moe_compile.convert(model, MoEConfig(num_experts=4, top_k=2), example_inputs=ids((1, 1)), inplace=True)
    captured = moe.transformer.h[0]
    for name, param in captured.named_parameters():  # same objects, same names: the state dict keys do not change
        assert name.startswith("moe_") or name.startswith("moe.") or param is block_params[name], name
    assert moe.lm_head.weight is moe.transformer.wte.weight  # tied weights stay tied

    moe.train()
    tokens = ids((2, 9))
    assert not torch.equal(moe(tokens), moe(tokens))  # the block's dropout runs in training ...
    logits = moe(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    layer = next(m for m in captured.modules() if isinstance(m, MoELayer))
    assert layer.router.weight.grad is not None and captured.qkv.weight.grad is not None
    moe.eval()
    with torch.no_grad():
        assert torch.equal(moe(tokens), moe(tokens))  # ... and not in eval mode


def test_captured_model_saves_and_loads(converted, tmp_path):
    moe = converted("gpt-runtime-mask", "upcycle top-2")
    moe_compile.save(moe, tmp_path)
    loaded = moe_compile.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids((2, 7))), moe(ids((2, 7))))


@pytest.mark.parametrize("model_name, target", [("gpt-runtime-mask", "ort"), ("gpt-runtime-mask-gated", "portable")])
def test_captured_blocks_export_and_match_in_onnx_runtime(dense, model_name, target, tmp_path):
    moe = moe_compile.convert(dense[model_name], MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.3),
                              example_inputs=ids((1, 1)))
    report = moe_compile.export(moe, ids((1, 1)), tmp_path / "m.onnx", target=target)
    assert len(report.layers) == 2
    parity = moe_compile.check_parity(moe, tmp_path / "m.onnx", ids((3, 37), seed=2))
    assert parity.passed, parity.table()


def test_a_block_without_example_inputs_is_reported_with_what_they_are_for(dense):
    with pytest.raises(moe_compile.NoFFNFoundError, match=r"(?s)not traceable with torch.fx.*pass example_inputs"):
        moe_compile.convert(dense["gpt-runtime-mask"], MoEConfig(num_experts=4))


def test_converting_a_converted_model_says_so(converted):
    with pytest.raises(moe_compile.MoECompileError, match="already converted"):
        moe_compile.convert(copy.deepcopy(converted("gpt-runtime-mask", "switch")), MoEConfig(num_experts=4),
                            example_inputs=ids((1, 1)))


class FlaggedBlock(torch.nn.Module):
    """A block fx cannot trace (a factory call on a traced size) that takes a flag through **kwargs, as
    transformers passes use_cache."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x, **kwargs):
        keep = torch.ones(x.shape[1], 1)
        y = self.down(torch.nn.functional.gelu(self.up(x))) * keep
        return 2 * y if kwargs.get("double") else y


class FlaggedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = FlaggedBlock()

    def forward(self, x, double: bool = False):
        return self.block(x, double=double)


def test_captured_block_refuses_a_call_it_was_not_recorded_for():
    """The capture holds double=False as a constant: the same call runs, another value is refused by name instead
    of silently computing the recorded call."""
    dense = FlaggedModel().eval()
    x = torch.randn(2, 5, 16)
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=(x,))
    assert "torch.export graph" in moe.moe_report.converted[0].reason
    with torch.no_grad():
        assert (moe(x) - dense(x)).abs().max() <= 1e-5
        with pytest.raises(moe_compile.MoECompileError, match="block was captured .* double=False .* double=True"):
            moe(x, double=True)
