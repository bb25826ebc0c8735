"""Blocks torch.fx cannot trace, captured with torch.export on the arguments recorded from one forward: the
hand-written GPT whose block builds its causal mask at run time and applies its FFN inline with a functional
(or gated) activation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import moe_compile
from moe_compile import MoEConfig, MoELayer
from moe_compile.passes.captured import CapturedBlock

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
        assert isinstance(block, CapturedBlock) and type(block.source).__name__.endswith("RuntimeMaskBlock")
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


def test_a_model_converted_in_eval_mode_stays_in_eval_mode():
    """The block's dropouts (p = 0.5 here) stay off until train() is called: the conversion is exact in eval."""
    model = make_dense_model("gpt-runtime-mask")
    for block in model.transformer.h:
        block.drop.p = 0.5
    moe = moe_compile.convert(model, EXACT["split k=E"], example_inputs=ids((1, 1)))
    assert not any(m.training for m in moe.modules())
    with torch.no_grad():
        assert (moe(ids((2, 9))) - model(ids((2, 9)))).abs().max() <= 1e-5


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


def test_a_flag_the_block_was_not_captured_with_captures_it_again():
    """convert captured the block with double=False (a constant of its graph); double=True is another kind of call,
    captured again on first use, and computes what the dense block computes."""
    dense = FlaggedModel().eval()
    x = torch.randn(2, 5, 16)
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=(x,))
    assert "torch.export graph" in moe.moe_report.converted[0].reason
    with torch.no_grad():
        assert (moe(x) - dense(x)).abs().max() <= 1e-5
        assert (moe(x, double=True) - dense(x, double=True)).abs().max() <= 1e-5
        single = torch.randn(1, 1, 16)  # captured at batch 2 x 5, the double=True graph serves 1 x 1 too
        assert (moe(single, double=True) - dense(single, double=True)).abs().max() <= 1e-5
    assert "2 graphs captured" in repr(moe.block)


def generate_with_cache(model, prompt, steps):
    """Greedy decoding through the model's KV cache: (every position's logits, the generated ids)."""
    logits, past = model(prompt, use_cache=True)
    every, tokens = [logits], prompt
    for _ in range(steps):
        step = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, step], 1)
        logits, past = model(step, past=past, use_cache=True)
        every.append(logits)
    return torch.cat(every, 1), tokens


@pytest.mark.parametrize("model_name", MODELS)
def test_captured_block_takes_a_kv_cache_and_use_cache_false(dense, converted, model_name):
    """convert recorded each block's call without a cache; calls with use_cache=True, with a past, at batch 1 and
    at other batches are new kinds of call, captured on first use: all equal the dense model (upcycled experts with
    renormalised gates compute the dense FFN), through the cache and without it."""
    moe = copy.deepcopy(converted(model_name, "upcycle top-2"))
    with torch.no_grad():
        for batch in (1, 3, 1):  # batch 1 fixes an axis of the decode graph; 3 needs another graph
            prompt = ids((batch, 6), seed=batch)
            moe_logits, moe_tokens = generate_with_cache(moe, prompt, steps=5)
            dense_logits, dense_tokens = generate_with_cache(dense[model_name], prompt, steps=5)
            assert torch.equal(moe_tokens, dense_tokens)
            assert (moe_logits - dense_logits).abs().max() <= 1e-5
            whole = moe(moe_tokens)  # use_cache=False, the call convert captured
            assert (whole - moe_logits).abs().max() <= 1e-5
    block = moe.transformer.h[0]
    assert isinstance(block, CapturedBlock) and "5 graphs captured" in repr(block)
    # convert's graph, prefill (use_cache=True) at batch 1 and 3, decode (a past) at batch 1 and 3


def test_captured_graphs_follow_a_copy_and_train_together(converted):
    """A deep copy's graphs call the copy's MoE layers; a gradient through the cache path reaches the same
    parameters as one through convert's graph."""
    original = converted("gpt-runtime-mask", "upcycle top-2")
    moe = copy.deepcopy(original)
    prompt = ids((2, 4))
    generate_with_cache(moe, prompt, steps=1)  # captures prefill and decode graphs in the copy
    copied = copy.deepcopy(moe)
    with torch.no_grad():
        for layer in copied.modules():
            if isinstance(layer, MoELayer):
                layer.router.weight.mul_(-1)
        assert torch.equal(generate_with_cache(moe, prompt, 2)[0], generate_with_cache(original, prompt, 2)[0])
        assert not torch.equal(generate_with_cache(copied, prompt, 2)[0], generate_with_cache(moe, prompt, 2)[0])
    logits, _ = moe(prompt, use_cache=True)
    logits.sum().backward()
    block = moe.transformer.h[0]
    assert block.qkv.weight.grad is not None and block.layers[0].router.weight.grad is not None


def test_a_kind_of_call_first_seen_while_tracing_names_the_block(converted):
    moe = copy.deepcopy(converted("gpt-runtime-mask", "switch"))
    with pytest.raises(moe_compile.MoECompileError, match=r"transformer.h.0 .* other past, use_cache.*eagerly"):
        torch.export.export(moe, (ids((2, 3)),), {"past": [(torch.zeros(2, 4, 5, 16),) * 2] * 2, "use_cache": True},
                            strict=False)
    with torch.no_grad():
        moe(ids((2, 3)), past=[(torch.zeros(2, 4, 5, 16),) * 2] * 2, use_cache=True)  # eagerly: captured now
    torch.export.export(moe, (ids((2, 3)),), {"past": [(torch.zeros(2, 4, 5, 16),) * 2] * 2, "use_cache": True},
                        strict=False)


class AppendingBlock(torch.nn.Module):
    """Hand-written code that collects present key/values in a list it is given: a graph would drop the append."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x, presents: list):
        presents.append(x)
        keep = torch.ones(x.shape[1], 1)
        return self.down(torch.nn.functional.gelu(self.up(x))) * keep


class AppendingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = AppendingBlock()

    def forward(self, x):
        presents = []
        return self.block(x, presents), presents


def test_a_block_that_grows_a_list_it_was_given_is_not_captured():
    with pytest.raises(moe_compile.NoFFNFoundError, match=r"(?s)grows presents in place .* drop silently"):
        moe_compile.convert(AppendingModel().eval(), MoEConfig(num_experts=4), example_inputs=(torch.randn(2, 5, 16),))
