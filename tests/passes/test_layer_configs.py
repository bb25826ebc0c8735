"""Per-site settings: convert(layer_configs=...) keeps sites dense or gives them their own MoEConfig, and the
result saves, loads, counts and exports like any converted model."""

from __future__ import annotations

import json

import pytest
import torch

import moe_compile as mc
from moe_compile.example_text import calibration_batches

from ..conftest import VOCAB, logits_of

SITES = ("transformer.h.0.mlp", "transformer.h.1.mlp")  # nanogpt's, and "model.layers.{0,1}.mlp" hf_llama's
LLAMA_SITES = ("model.layers.0.mlp", "model.layers.1.mlp")
QUARTER = mc.MoEConfig(experts="split", num_experts=4, top_k=1)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def test_a_site_kept_dense_computes_its_dense_ffn(nanogpt, ids):
    """Site 0 dense, site 1 split k = E: the whole model is the dense one; site 1 at k = 1 of 4 is not."""
    exact = mc.convert(nanogpt, QUARTER, layer_configs={SITES[0]: None,
                                                        SITES[1]: mc.MoEConfig(experts="split", num_experts=4,
                                                                               top_k=4)})
    torch.testing.assert_close(logits_of(exact, ids), logits_of(nanogpt, ids), atol=1e-5, rtol=1e-5)
    sparse = mc.convert(nanogpt, QUARTER, layer_configs={SITES[0]: None})
    assert not torch.allclose(logits_of(sparse, ids), logits_of(nanogpt, ids), atol=1e-3)
    actions = {s.name: s.action for s in sparse.moe_report.sites if s.name in SITES}
    assert actions == {SITES[0]: "kept dense", SITES[1]: "converted"}
    assert [name for name, _ in mc.moe.iter_moe_layers(sparse)] == [SITES[1]]
    assert mc.model_stats(sparse).active_fraction == pytest.approx((1 + 0.25) / 2)


def test_each_site_gets_its_own_config(hf_llama):
    moe = mc.convert(hf_llama, QUARTER, layer_configs={LLAMA_SITES[1]: mc.MoEConfig(num_experts=2, top_k=1)})
    layers = dict(mc.moe.iter_moe_layers(moe))
    assert [layers[s.layer].num_experts for s in moe.moe_report.converted] == [4, 2]
    assert moe.moe_report.config_of(LLAMA_SITES[0]) == QUARTER
    assert moe.moe_report.config_of(LLAMA_SITES[1]).experts == "upcycle"
    stats = {s.name: s.active_fraction for s in mc.model_stats(moe).sites}
    assert stats == {LLAMA_SITES[0]: 0.25, LLAMA_SITES[1]: 1.0}


def test_calibration_fits_each_site_with_its_own_settings(nanogpt):
    batches = calibration_batches(length=16, count=8, batch_size=4,
                                  data=torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(2)))
    moe = mc.convert(nanogpt, mc.MoEConfig(experts="split", num_experts=4, top_k=2, distill_steps=3),
                     layer_configs={SITES[1]: mc.MoEConfig(experts="split", num_experts=8, top_k=2, distill_steps=0)},
                     calibration_data=batches, progress=False)
    first, second = moe.moe_report.converted
    assert any(key.startswith("distill_") for key in first.calibration)
    assert not any(key.startswith("distill_") for key in second.calibration) and second.calibration
    assert moe.moe_report.config_of(SITES[1]).split_strategy == "coactivation"  # unset: the calibrated default
    layers = dict(mc.moe.iter_moe_layers(moe))
    shared = [moe.moe_report.config_of(site.name).shared_experts for site in (first, second)]  # "auto", resolved
    assert all(isinstance(s, int) for s in shared) and all(f"error_{s}_shared" in site.calibration
                                                            for s, site in zip(shared, (first, second)))
    assert (layers[first.layer].num_experts + shared[0], layers[second.layer].num_experts + shared[1]) == (4, 8)


def test_the_plan_saves_and_loads_bit_equal(nanogpt, ids, tmp_path):
    moe = mc.convert(nanogpt, QUARTER, layer_configs={SITES[0]: None})
    mc.save(moe, tmp_path)
    recipe = json.loads((tmp_path / "moe_recipe.json").read_text())
    assert recipe["layer_configs"] == {SITES[0]: None}
    loaded = mc.load(tmp_path)
    assert loaded.moe_report.layer_configs == {SITES[0]: None}
    assert torch.equal(logits_of(loaded, ids), logits_of(moe, ids))


@pytest.mark.parametrize("target", ("portable", "ort"))
def test_the_plan_exports_and_matches_eager(hf_llama, tmp_path, target):
    half = mc.MoEConfig(experts="split", num_experts=4, top_k=2)
    moe = mc.convert(hf_llama, QUARTER, layer_configs={LLAMA_SITES[0]: half})
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    mc.export(moe, (ids,), tmp_path / "plan.onnx", target=target)
    report = mc.check_parity(moe, tmp_path / "plan.onnx",
                             (torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(8)),))
    assert report.passed and report.routing.share == 1.0


@pytest.mark.parametrize("layer_configs, error, message", [
    ({"transformer.h.9.mlp": None}, mc.MoECompileError, "no convertible FFN site"),
    ({SITES[0]: None, SITES[1]: None}, mc.MoECompileError, "keeps every FFN site"),
    ({SITES[0]: {"num_experts": 4}}, TypeError, "give each site a MoEConfig"),
    ([SITES[0]], TypeError, "must map site names"),
])
def test_bad_layer_configs_name_the_problem(nanogpt, layer_configs, error, message):
    with pytest.raises(error, match=message):
        mc.convert(nanogpt, QUARTER, layer_configs=layer_configs)
