"""Parameter and FLOP counts, dense vs MoE: formulas against the layers convert really builds."""

import pytest

from moe_compile import MoEConfig, convert, model_stats
from moe_compile.moe import iter_moe_layers
from tests.conftest import make_dense_model

pytestmark = pytest.mark.filterwarnings("ignore:expert_choice routing is not causal")


@pytest.mark.parametrize("name, config", [
    ("nanogpt", dict(experts="upcycle")),
    ("nanogpt", dict(experts="split")),
    ("hf-llama", dict(experts="upcycle", routing="switch")),
    ("hf-llama", dict(experts="split", routing="expert_choice")),
])
def test_parameter_counts_match_the_converted_model(name, config):
    dense = make_dense_model(name)
    config = MoEConfig(num_experts=4, **config)
    model = convert(dense, config)
    layers = dict(iter_moe_layers(model))

    predicted = model_stats(dense, config)
    counted = model_stats(model)

    assert predicted.to_dict() == counted.to_dict()
    for site in counted.sites:
        assert site.moe_params == sum(p.numel() for p in layers[site.name].parameters())
    assert counted.dense_total_params == sum(p.numel() for p in dense.parameters())
    assert counted.moe_total_params == sum(p.numel() for p in model.parameters())


def test_flops_per_token():
    d, f = 64, 128  # hf-llama: gated, 3 projections
    llama = make_dense_model("hf-llama")
    top2 = model_stats(llama, MoEConfig(num_experts=4, experts="split"))
    site = top2.sites[0]
    assert site.dense_flops == 2 * 3 * d * f
    assert site.moe_flops == 2 * d * 4 + 2 * (2 * 3 * d * f // 4)  # router + 2 experts of width f/4
    assert top2.dense_flops == 2 * site.dense_flops

    chosen = model_stats(llama, MoEConfig(num_experts=4, routing="expert_choice", top_k=1, capacity_factor=2.0))
    assert chosen.sites[0].moe_flops == 2 * d * 4 + 2.0 * (2 * 3 * d * f)  # upcycled experts, 2 per token on average


def test_a_config_that_cannot_split_the_ffn_is_refused():
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts: .* not divisible by 3"):
        model_stats(make_dense_model("nanogpt"), MoEConfig(num_experts=3, experts="split"))
