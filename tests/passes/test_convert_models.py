"""convert() on the four target models: exactness against the dense original, the report, the structure it
leaves, determinism, the input left untouched, training, dtypes, and expert-choice's causality warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import moe_compile
from moe_compile import MoEConfig, MoELayer, convert

from ..conftest import DENSE_MODELS, VOCAB, logits_of, make_dense_model

EXACT = {
    "upcycle-token_choice-top2": MoEConfig(num_experts=4, top_k=2, routing="token_choice", experts="upcycle",
                                           normalize=True),
    "upcycle-token_choice-top4": MoEConfig(num_experts=4, top_k=4, experts="upcycle"),
    "split-token_choice-k=E": MoEConfig(num_experts=4, top_k=4, routing="token_choice", experts="split"),
    "split-random-token_choice-k=E": MoEConfig(num_experts=8, top_k=8, experts="split", split_strategy="random"),
    "split-expert_choice-k=E": MoEConfig(num_experts=4, top_k=4, routing="expert_choice", experts="split",
                                         capacity_factor=1.0),
    "split-expert_choice-k=E-cf2": MoEConfig(num_experts=4, top_k=4, routing="expert_choice", experts="split",
                                             capacity_factor=2.0),
}


@pytest.mark.filterwarnings("ignore:expert_choice routing is not causal")
@pytest.mark.parametrize("config_name", sorted(EXACT))
@pytest.mark.parametrize("model_name", DENSE_MODELS)
def test_exact_against_dense(dense_models, token_ids, model_name, config_name):
    dense = dense_models[model_name]
    converted = convert(dense, EXACT[config_name])
    assert len(converted.moe_report.converted) == 2
    assert sum(isinstance(m, MoELayer) for m in converted.modules()) == 2
    with torch.no_grad():
        error = (logits_of(converted, token_ids) - logits_of(dense, token_ids)).abs().max().item()
    assert error <= 1e-5


@pytest.mark.parametrize("model_name", DENSE_MODELS)
def test_dropping_experts_shows_in_logits(dense_models, token_ids, model_name):
    """The exactness test can fail: split experts with k < E (or a capacity that drops) change the logits."""
    dense = dense_models[model_name]
    with torch.no_grad():
        ref = logits_of(dense, token_ids)
        for config in (MoEConfig(num_experts=4, top_k=3, experts="split"),
                       MoEConfig(num_experts=4, top_k=4, experts="split", capacity_factor=0.5),
                       MoEConfig(num_experts=4, top_k=2, experts="upcycle", normalize=False)):
            error = (logits_of(convert(dense, config), token_ids) - ref).abs().max().item()
            assert error > 1e-3, config


def test_structure_after_conversion(nanogpt, nanogpt_inline, hf_gpt2, hf_llama):
    config = MoEConfig(num_experts=4)
    converted = convert(nanogpt, config)
    assert type(converted) is type(nanogpt)
    for block in converted.transformer.h:
        assert type(block).__name__ == "Block" and isinstance(block.mlp, MoELayer)
        assert type(block.attn).__name__ == "CausalSelfAttention"

    inline = convert(nanogpt_inline, config)
    for block in inline.transformer.h:  # the FFN was inline: the block is now its rewritten fx graph
        assert isinstance(block, fx.GraphModule) and type(block).__name__ == "InlineBlock"
        assert isinstance(block.moe, MoELayer)
        assert not hasattr(block, "fc_in") and not hasattr(block, "fc_out")
        targets = [n.target for n in block.graph.nodes if n.op == "call_module"]
        assert targets.count("moe") == 1 and "fc_in" not in targets

    gpt2 = convert(hf_gpt2, config)
    assert type(gpt2) is type(hf_gpt2)
    assert all(isinstance(b.mlp, MoELayer) and type(b).__name__ == "GPT2Block" for b in gpt2.transformer.h)
    llama = convert(hf_llama, config)
    assert all(isinstance(layer.mlp, MoELayer) and layer.mlp.gated for layer in llama.model.layers)


@pytest.mark.parametrize("model_name", ["nanogpt", "nanogpt-inline"])
def test_report_names_sites_and_actions(dense_models, model_name):
    converted = convert(dense_models[model_name], MoEConfig(num_experts=4, experts="split"))
    report = converted.moe_report
    assert report.config == MoEConfig(num_experts=4, experts="split")
    assert [s.action for s in report.sites] == ["converted", "converted"]
    for i, site in enumerate(report.sites):
        assert site.pattern == "Linear -> gelu -> Linear -> Dropout"
        assert (site.d_model, site.d_ff, site.gated, site.bias) == (64, 256, False, True)
        if model_name == "nanogpt":
            assert site.name == f"transformer.h.{i}.mlp"
            assert site.reason == "replaced module MLP with MoELayer"
        else:
            assert site.name == f"transformer.h.{i}:fc_in..fc_out"
            assert site.reason == f"rewrote transformer.h.{i}'s fx graph to call an MoELayer"
    as_dict = report.to_dict()
    assert as_dict["config"]["experts"] == "split" and len(as_dict["sites"]) == 2
    table = str(report)
    assert "converted" in table and report.sites[0].name in table


def test_input_untouched_unless_inplace(nanogpt, token_ids):
    model = copy.deepcopy(nanogpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(token_ids)
    converted = convert(model, MoEConfig(num_experts=4, upcycle_noise=0.1))
    assert converted is not model
    assert not hasattr(model, "moe_report")
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p1.data_ptr() != p2.data_ptr() for p1 in model.parameters() for p2 in converted.parameters())
    with torch.no_grad():
        assert torch.equal(model(token_ids), ref)

    same = convert(model, MoEConfig(num_experts=4), inplace=True)
    assert same is model and isinstance(model.transformer.h[0].mlp, MoELayer) and hasattr(model, "moe_report")


@pytest.mark.filterwarnings("ignore:expert_choice routing is not causal")
@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, upcycle_noise=0.05, seed=1),
                                    MoEConfig(num_experts=4, experts="split", seed=1),
                                    MoEConfig(num_experts=4, experts="split", split_strategy="random", seed=1,
                                              routing="expert_choice", router_init="random")],
                         ids=lambda c: f"{c.experts}-{c.split_strategy}-{c.routing}")
@pytest.mark.parametrize("model_name", ["nanogpt-inline", "hf-llama"])
def test_deterministic_for_a_seed(dense_models, model_name, config):
    dense = dense_models[model_name]
    a = convert(dense, config).state_dict()
    b = convert(dense, copy.deepcopy(config)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = convert(dense, MoEConfig(**{**config.to_dict(), "seed": 2})).state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)
    # the two layers of one model are seeded apart
    layers = [m for m in convert(dense, config).modules() if isinstance(m, MoELayer)]
    assert not torch.equal(layers[0].router.weight, layers[1].router.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("model_name", ["nanogpt", "hf-gpt2", "hf-llama"])
def test_dtype_kept(model_name, dtype, token_ids):
    dense = make_dense_model(model_name).to(dtype)
    converted = convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"))
    assert {p.dtype for p in converted.parameters()} == {dtype}
    with torch.no_grad():
        out, ref = logits_of(converted, token_ids), logits_of(dense, token_ids)
    assert out.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 0.1
    assert (out - ref).abs().max().item() <= tol


# ---------------------------------------------------------------- expert-choice warning and causality

def test_expert_choice_warns_once_that_it_is_not_causal(nanogpt):
    config = MoEConfig(num_experts=4, routing="expert_choice")
    with pytest.warns(UserWarning, match="not causal") as record:
        convert(nanogpt, config)  # two sites, one warning
    assert len([w for w in record if "not causal" in str(w.message)]) == 1
    message = str(record[0].message)
    assert "expert_choice" in message and "position t can depend on later positions" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nanogpt, MoEConfig(num_experts=4, routing="token_choice"))
        convert(nanogpt, MoEConfig(num_experts=4, routing="switch"))


@pytest.mark.filterwarnings("ignore:expert_choice routing is not causal")
@pytest.mark.parametrize("model_name", ["nanogpt", "hf-gpt2"])
def test_token_choice_is_causal_expert_choice_is_not(dense_models, model_name):
    dense = dense_models[model_name]
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[0, -6:] = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(ids, changed)
    prefix = slice(0, 18)

    def prefix_change(config):
        model = convert(dense, config)
        with torch.no_grad():
            return (logits_of(model, ids)[:, prefix] - logits_of(model, changed)[:, prefix]).abs().max().item()

    for config in (MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.3),
                   MoEConfig(num_experts=4, top_k=1, experts="split"),
                   MoEConfig(num_experts=4, routing="switch", capacity_factor=4.0, upcycle_noise=0.3)):
        assert prefix_change(config) <= 1e-6, config
    # expert-choice: each expert keeps the top 6 of 24 tokens; the last 6 tokens compete for those slots
    expert_choice = MoEConfig(num_experts=4, top_k=1, routing="expert_choice", experts="split",
                              capacity_factor=1.0)
    assert prefix_change(expert_choice) > 1e-3


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, top_k=2, experts="split"),
                                    MoEConfig(num_experts=4, routing="switch", upcycle_noise=0.1)],
                         ids=lambda c: f"{c.experts}-{c.routing}")
@pytest.mark.parametrize("model_name", ["nanogpt", "hf-llama"])
def test_training_step_reaches_router_and_experts(model_name, config):
    model = convert(make_dense_model(model_name), config).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2 and all(layer.training for layer in layers)
    logits = logits_of(model, ids)
    task = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    aux, parts = moe_compile.aux_loss(model)
    assert set(parts) == {"load_balancing", "z_loss"}
    expected = config.load_balance_coef * parts["load_balancing"] + config.z_loss_coef * parts["z_loss"]
    assert torch.allclose(aux, expected) and aux.requires_grad and aux > 0
    # each part is the sum over layers
    assert torch.allclose(parts["z_loss"], sum(layer.aux_losses["z_loss"] for layer in layers))

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    (task + aux).backward()
    for layer in layers:
        for param in (layer.router.weight, layer.up_weight, layer.down_weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
        if layer.gated:
            assert layer.gate_weight.grad.abs().sum() > 0
    optimizer.step()
    names = [n for n, _ in model.named_parameters() if "router.weight" in n or "up_weight" in n]
    assert len(names) == 4
    for name, param in model.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), name

    stats = moe_compile.routing_stats(model)
    assert len(stats) == 2
    for s in stats.values():
        assert int(s.tokens_per_expert.sum()) <= 32 * config.top_k and 0.0 <= s.dropped_fraction < 1.0


def test_aux_loss_alone_trains_the_router(nanogpt, token_ids):
    model = convert(nanogpt, MoEConfig(num_experts=4, load_balance_coef=1.0, z_loss_coef=1.0))
    logits_of(model, token_ids)
    aux, _ = moe_compile.aux_loss(model)
    aux.backward()
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        assert layer.router.weight.grad.abs().sum() > 0
    total, _ = moe_compile.aux_loss(model, load_balance_coef=0.0, z_loss_coef=0.0)
    assert float(total.detach()) == 0.0


def test_aux_loss_before_forward_says_what_to_do(nanogpt):
    model = convert(nanogpt, MoEConfig(num_experts=4))
    with pytest.raises(RuntimeError, match="Call the model first"):
        moe_compile.aux_loss(model)
    assert moe_compile.routing_stats(model) == {}


def test_routing_stats_per_layer(nanogpt, token_ids):
    model = convert(nanogpt, MoEConfig(num_experts=4, routing="switch", capacity_factor=0.5))
    with torch.no_grad():
        logits_of(model, token_ids)
    stats = moe_compile.routing_stats(model)
    assert sorted(stats) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    tokens = token_ids.numel()
    for s in stats.values():
        assert s.tokens_per_expert.shape == (4,)
        assert int(s.tokens_per_expert.max()) <= tokens // 8  # C = ceil(0.5 * 32 / 4) = 4
        assert s.dropped_fraction == pytest.approx(1 - int(s.tokens_per_expert.sum()) / tokens)
        assert s.dropped_fraction >= 0.5  # capacity for half the tokens at most


def test_converted_model_keeps_train_mode(nanogpt):
    model = copy.deepcopy(nanogpt).train()
    converted = convert(model, MoEConfig(num_experts=4))
    assert all(m.training for m in converted.modules())
