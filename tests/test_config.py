"""MoEConfig: defaults resolved per routing and expert builder, and every bad combination refused at
construction with a ValueError that names the field and the fix."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from moe_compile import MoEConfig, convert


@pytest.mark.parametrize("kwargs, field, fix", [
    (dict(routing="topk"), "routing", "Choose one of switch, token_choice, expert_choice"),
    (dict(experts="clone"), "experts", "Choose one of upcycle, split"),
    (dict(experts="split", split_strategy="spectral"), "split_strategy", "Choose one of kmeans, random, contiguous"),
    (dict(router_init="zeros"), "router_init", "Choose one of random, centroid"),
    (dict(combine="max"), "combine", "Choose one of weighted, unweighted"),
    (dict(num_experts=1), "num_experts", "num_experts=8"),
    (dict(num_experts=4.0), "num_experts", "num_experts=8"),
    (dict(num_experts=True), "num_experts", "num_experts=8"),
    (dict(num_experts=4, top_k=5), "top_k", "Lower top_k or raise num_experts"),
    (dict(num_experts=4, top_k=5, routing="expert_choice"), "top_k", "Lower top_k or raise num_experts"),
    (dict(top_k=0), "top_k", "Use top_k=1 or 2"),
    (dict(top_k=1.5), "top_k", "Use top_k=1 or 2"),
    (dict(routing="switch", top_k=2), "top_k", "Use routing='token_choice'"),
    (dict(capacity_factor=0), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(capacity_factor=-1.0, routing="switch"), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(capacity_factor=0.0, routing="expert_choice"), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(capacity_factor=float("nan")), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(capacity_factor=float("inf")), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(capacity_factor="1.0"), "capacity_factor", "Use 1.0 to 2.0"),
    (dict(routing="switch", normalize=True), "normalize", "Leave normalize unset"),
    (dict(routing="expert_choice", normalize=True), "normalize", "Leave normalize unset"),
    (dict(router_init="centroid"), "router_init", "Use router_init='random' with experts='upcycle'"),
    (dict(routing="expert_choice", expert_choice_group=0), "expert_choice_group", "Use 'sequence' or a positive"),
    (dict(routing="expert_choice", expert_choice_group="batch"), "expert_choice_group", "Use 'sequence'"),
    (dict(router_jitter=-0.1), "router_jitter", "Use router_jitter=0"),
    (dict(upcycle_noise=-1.0), "upcycle_noise", "Use upcycle_noise=0"),
    (dict(load_balance_coef=-1.0), "load_balance_coef", "Use load_balance_coef=0"),
    (dict(z_loss_coef=-1.0), "z_loss_coef", "Use z_loss_coef=0"),
    (dict(router_init="calibrated"), "router_init", "Use router_init='random' with experts='upcycle'"),
    (dict(shared_experts=1, top_k=2), "shared_experts", "Use experts='split'"),
    (dict(split_strategy="coactivation"), "split_strategy", "Use experts='split'"),
    (dict(experts="split", shared_experts=2, top_k=2), "shared_experts", "Use shared_experts <= 1"),
    (dict(experts="split", shared_experts=-1), "shared_experts", "Use 0 (no shared neurons)"),
    (dict(experts="split", shared_experts="some"), "shared_experts", "or 'auto' (chosen on calibration data)"),
    (dict(shared_experts="auto"), "shared_experts", "Use experts='split'"),
    (dict(experts="split", routing="switch", shared_experts=1, top_k=1), "shared_experts", "Use shared_experts <= 0"),
    (dict(experts="split", compensate=True, combine="weighted"), "compensate", "Use combine='unweighted'"),
    (dict(experts="split", compensate=True, routing="expert_choice"), "compensate", "Use routing='token_choice'"),
    (dict(experts="split", distill_steps=-5), "distill_steps", "Use 0 (off)"),
    (dict(experts="split", calibration_tokens=10), "calibration_tokens", "Use 8192"),
])
def test_invalid_config_names_field_and_fix(kwargs, field, fix):
    with pytest.raises(ValueError) as info:
        MoEConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"MoEConfig.{field}:"), message
    assert fix in message, message


@pytest.mark.parametrize("kwargs, expected", [
    (dict(routing="switch"), dict(top_k=1, capacity_factor=1.25, normalize=False, router_init="random",
                                  combine="weighted")),
    (dict(routing="token_choice"), dict(top_k=2, capacity_factor=None, normalize=True, router_init="random",
                                        combine="weighted")),
    (dict(routing="expert_choice"), dict(top_k=2, capacity_factor=1.0, normalize=False)),
    (dict(experts="split"), dict(router_init="centroid", combine="unweighted", split_strategy="kmeans")),
    (dict(experts="split", router_init="random", combine="weighted"), dict(router_init="random", combine="weighted")),
])
def test_defaults_resolved(kwargs, expected):
    config = MoEConfig(**kwargs)
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_calibrated_defaults_fill_only_unset_fields():
    data_free = MoEConfig(num_experts=32, top_k=8, experts="split")
    assert (data_free.split_strategy, data_free.router_init, data_free.shared_experts, data_free.compensate,
            data_free.distill_steps) == ("kmeans", "centroid", 0, False, 0)
    calibrated = data_free.with_calibration()
    assert (calibrated.split_strategy, calibrated.router_init, calibrated.shared_experts, calibrated.compensate,
            calibrated.distill_steps) == ("coactivation", "calibrated", "auto", True, 200)
    explicit = MoEConfig(num_experts=8, top_k=2, experts="split", split_strategy="kmeans", shared_experts=0)
    assert (explicit.with_calibration().split_strategy, explicit.with_calibration().shared_experts) == ("kmeans", 0)
    assert MoEConfig(num_experts=8, top_k=1, experts="split").with_calibration().shared_experts == 0
    assert [MoEConfig(num_experts=16, top_k=k, experts="split").shared_choices for k in (1, 2, 4, 6, 8)] == \
        [[0], [0, 1], [0, 1, 2, 3], [0, 2, 3, 4], [0, 2, 4, 6]]
    assert MoEConfig(num_experts=4, experts="upcycle").with_calibration() == MoEConfig(num_experts=4)
    assert MoEConfig.from_dict(calibrated.to_dict()) == calibrated


def test_dict_round_trip_and_unknown_fields():
    config = MoEConfig(num_experts=4, routing="expert_choice", capacity_factor=2.0, expert_choice_group=8, seed=3)
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=re.escape("unknown fields ['num_expert']")):
        MoEConfig.from_dict({"num_expert": 4})


def test_split_width_not_divisible_raised_by_convert_before_anything_changes(nanogpt):
    model = copy.deepcopy(nanogpt)  # d_ff = 256
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    config = MoEConfig(num_experts=3, experts="split")  # valid on its own: the width is a property of the model
    with pytest.raises(ValueError) as info:
        convert(model, config, inplace=True)
    message = str(info.value)
    assert message.startswith("MoEConfig.num_experts:"), message
    assert "256 is not divisible by 3" in message and "transformer.h.0.mlp" in message
    assert "Pick num_experts among the divisors of 256, or use experts='upcycle'" in message
    assert [type(m) for m in model.modules()] == modules_before
    assert not hasattr(model, "moe_report")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_upcycle_does_not_need_divisible_width(nanogpt):
    converted = convert(nanogpt, MoEConfig(num_experts=3, experts="upcycle"))
    assert len(converted.moe_report.converted) == 2


def test_convert_rejects_wrong_argument_types(nanogpt):
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        convert(nanogpt, {"num_experts": 4})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert(lambda x: x, MoEConfig())
