"""convert(calibration_data=...) on the committed trained GPTs: the split invariant with every calibrated part,
quality against the data-free split, fine-grained experts, batch kinds, sampling, save/load, export, stats."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

import moe_compile as mc
from moe_compile.example_models import load_checkpoint
from moe_compile.example_text import calibration_batches, perplexity, stdlib_bytes
from moe_compile.moe import DenseFFN, iter_moe_layers
from moe_compile.passes.calibrate import InputSample, record_ffn_inputs

CHECKPOINTS = Path(__file__).resolve().parents[2] / "examples" / "checkpoints"
CALIBRATED = dict(split_strategy="coactivation", router_init="calibrated", compensate=True)
SMALL = dict(experts="split", calibration_tokens=1024)  # fits on 1,024 sampled tokens per site: fast tests


@pytest.fixture(scope="module")
def gpts():
    return {v: load_checkpoint(CHECKPOINTS / f"tiny_gpt_{v}.safetensors") for v in ("relu", "gelu", "swiglu")}


@pytest.fixture(scope="module")
def batches():
    return calibration_batches(length=64, count=32, batch_size=16)  # 2,048 tokens


@pytest.fixture(scope="module")
def validation():
    return stdlib_bytes("validation")[:64 * 16 + 1]


@pytest.fixture(autouse=True)
def one_thread():
    """Multi-threaded CPU kernels may differ in the last bits from run to run, and a discrete choice (a k-means
    assignment, a top-k) can then flip: determinism is checked with deterministic kernels (and these small
    models run faster on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ppl(model, validation):
    return perplexity(model, validation, length=64)


@pytest.mark.parametrize("variant", ["relu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 2])
def test_all_experts_active_reproduce_dense_with_calibration(gpts, batches, validation, variant, shared):
    dense = gpts[variant]
    config = mc.MoEConfig(num_experts=16, top_k=16, **SMALL, shared_experts=shared, distill_steps=0,
                          **CALIBRATED)
    moe = mc.convert(dense, config, calibration_data=batches, progress=False)
    x = validation[:-1].view(16, 64).long()
    assert torch.allclose(moe(x), dense(x), atol=2e-5, rtol=0)
    assert _ppl(moe, validation) == pytest.approx(_ppl(dense, validation), rel=1e-5)


def test_calibration_defaults_beat_the_data_free_split(gpts, batches, validation):
    dense = gpts["swiglu"]
    config = mc.MoEConfig(num_experts=32, top_k=8, **SMALL, distill_steps=0)
    data_free = mc.convert(dense, config, progress=False)
    calibrated = mc.convert(dense, config, calibration_data=batches, progress=False)
    resolved = calibrated.moe_report.config
    assert (resolved.split_strategy, resolved.router_init, resolved.compensate) == ("coactivation", "calibrated", True)
    assert resolved.shared_experts in config.shared_choices and data_free.moe_report.config.shared_experts == 0
    assert mc.model_stats(calibrated).active_fraction == pytest.approx(0.25)
    assert _ppl(calibrated, validation) < _ppl(data_free, validation)
    for site in calibrated.moe_report.converted:
        assert 0.5 < site.calibration["router_recall_held_out"] <= 1.0


def test_fine_grained_experts_in_every_part(gpts, batches):
    dense = gpts["gelu"]  # d_ff 512: 128 experts of 4 neurons, 4 of them shared
    config = mc.MoEConfig(num_experts=128, top_k=32, **SMALL, shared_experts=4, distill_steps=2)
    moe = mc.convert(dense, config, calibration_data=batches, progress=False)
    layer = next(layer for _, layer in iter_moe_layers(moe))
    assert (layer.num_experts, layer.expert_width, layer.shared.width) == (124, 4, 16)
    assert layer.router.top_k == 28
    report = moe.moe_report.converted[0].calibration
    assert report["distill_error_after"] <= report["distill_error_before"]
    assert torch.isfinite(moe(batches[0][:2])).all()


def test_auto_shared_experts_take_each_sites_count_of_least_held_out_error(gpts, batches, tmp_path):
    config = mc.MoEConfig(num_experts=16, top_k=4, **SMALL, distill_steps=0)
    moe = mc.convert(gpts["swiglu"], config, calibration_data=batches, progress=False)
    report = moe.moe_report
    chosen = {}
    for site in report.converted:
        errors = {s: site.calibration[f"error_{s}_shared"] for s in (0, 1, 2, 3)}
        assert all(0 < error < 1 for error in errors.values())
        chosen[site.name] = min(errors, key=errors.get)
        layer = moe.get_submodule(site.layer)
        assert report.config_of(site.name).shared_experts == chosen[site.name]
        assert layer.router.num_experts == 16 - chosen[site.name]
        assert (layer.shared is None) == (chosen[site.name] == 0)
    counts = list(chosen.values())
    assert report.config.shared_experts == max(sorted(set(counts)), key=counts.count)  # the model-wide count
    assert set(report.layer_configs) == {name for name, s in chosen.items() if s != report.config.shared_experts}
    mc.save(moe, tmp_path / "auto")
    loaded = mc.load(tmp_path / "auto")
    assert {site.name: loaded.moe_report.config_of(site.name).shared_experts for site in report.converted} == chosen
    fixed = {name: mc.MoEConfig(num_experts=16, top_k=4, **SMALL, distill_steps=0, shared_experts=s)
             for name, s in chosen.items()}  # each site's chosen count given: the same layers, the same fit figures
    explicit = mc.convert(gpts["swiglu"], config, layer_configs=fixed, calibration_data=batches, progress=False)
    for site, again in zip(report.converted, explicit.moe_report.converted):
        assert site.calibration["router_recall_held_out"] == again.calibration["router_recall_held_out"]
        ours, theirs = moe.get_submodule(site.layer).state_dict(), explicit.get_submodule(again.layer).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for (name, x), (_, y) in zip(moe.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="shared_experts='auto' is computed from activations. Pass calibration_data"):
        mc.convert(gpts["swiglu"], mc.MoEConfig(num_experts=16, top_k=4, experts="split", shared_experts="auto"),
                   progress=False)


def test_distillation_is_deterministic_and_does_not_hurt(gpts, batches):
    config = mc.MoEConfig(num_experts=8, top_k=2, **SMALL, distill_steps=10)
    a, b = (mc.convert(gpts["swiglu"], config, calibration_data=batches, progress=False) for _ in range(2))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    for site in a.moe_report.converted:
        assert site.calibration["distill_error_after"] <= site.calibration["distill_error_before"]
        assert site.calibration["distill_seconds"] > 0


def test_batches_as_tensor_tuple_or_dict_give_the_same_model(gpts, batches):
    dense = gpts["relu"]
    config = mc.MoEConfig(num_experts=8, top_k=2, **SMALL, distill_steps=0)
    models = [mc.convert(dense, config, calibration_data=data, progress=False)
              for data in (batches, [(b,) for b in batches], [{"idx": b} for b in batches])]
    for other in models[1:]:
        for (name, x), (_, y) in zip(models[0].state_dict().items(), other.state_dict().items()):
            assert torch.equal(x, y), name


def test_bad_calibration_input_is_refused(gpts, batches):
    config = mc.MoEConfig(num_experts=8, top_k=2, **SMALL)
    with pytest.raises(TypeError, match="a batch must be a tensor of token ids"):
        mc.convert(gpts["relu"], config, calibration_data=["text"], progress=False)
    with pytest.raises(ValueError, match="saw no tokens"):
        mc.convert(gpts["relu"], config, calibration_data=[], progress=False)
    with pytest.raises(ValueError, match=r"MoEConfig.router_init: .*Pass calibration_data"):
        mc.convert(gpts["relu"], dataclasses.replace(config, router_init="calibrated"))
    with pytest.raises(ValueError, match=r"MoEConfig.shared_experts: .*Pass calibration_data"):
        mc.convert(gpts["relu"], dataclasses.replace(config, shared_experts=1))
    with pytest.raises(ValueError, match=r"calibration builds split experts .* experts='upcycle'"):
        mc.convert(gpts["relu"], mc.MoEConfig(num_experts=8), calibration_data=batches, progress=False)


def test_input_sample_is_bounded_uniform_and_seeded():
    rows = torch.arange(10_000, dtype=torch.float32).unsqueeze(1)
    samples = []
    for seed in (0, 0, 1):
        sample = InputSample(500, torch.Generator().manual_seed(seed))
        for chunk in rows.split(300):
            sample.add(chunk)
        samples.append(sample.rows)
    assert samples[0].shape == (500, 1) and sample.seen == 10_000
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    assert len(samples[0].unique()) == 500
    assert 3_500 < float(samples[0].mean()) < 6_500  # uniform over the stream, not its first rows


class _SharedBlockModel(torch.nn.Module):
    """One FFN applied twice per forward (ALBERT shares its layers so), then a head that counts its calls."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 8)
        self.head_calls = 0

    def forward(self, x):
        for _ in range(2):
            x = x + self.down(torch.relu(self.up(x)))
        self.head_calls += 1
        return self.head(x)


def test_recording_stops_each_forward_once_every_site_has_seen_the_batch():
    model = _SharedBlockModel()
    ffn = DenseFFN(model.up.weight, model.up.bias, model.down.weight, model.down.bias, torch.relu)
    batches = list(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0)))
    recorded = record_ffn_inputs(model, {"ffn": ffn}, batches, cap=1000, seed=0, progress=False)["ffn"]
    assert model.head_calls == 1  # the first batch runs whole (it tells how many calls a forward makes), no other
    seen = []
    model.up.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for batch in batches:
        model(batch)
    assert torch.equal(recorded, torch.cat(seen))  # both calls of every batch, as whole forwards see them


def test_save_load_export_and_stats_with_shared_experts_and_compensation(gpts, batches, tmp_path):
    dense = gpts["swiglu"]
    config = mc.MoEConfig(num_experts=8, top_k=2, **SMALL, shared_experts=1, distill_steps=0, **CALIBRATED)
    moe = mc.convert(dense, config, calibration_data=batches, progress=False)
    x = batches[0][:2]

    back = mc.load(mc.save(moe, tmp_path / "saved"))
    assert torch.equal(back(x), moe(x))

    exported = mc.export(moe, x, tmp_path / "moe.onnx", target="ort")
    assert {layer.lowering for layer in exported.layers} == {"com.microsoft.MoE"}  # top-1 routed + shared expert
    assert mc.check_parity(moe, tmp_path / "moe.onnx", batches[1][:3, :40]).passed

    stats = mc.model_stats(moe)
    layers = dict(iter_moe_layers(moe))
    for site in stats.sites:
        assert site.moe_params == sum(p.numel() for p in layers[site.name].parameters())
        assert site.active_fraction == pytest.approx(0.25)
    assert stats.moe_total_params == sum(p.numel() for p in moe.parameters())


def test_convert_leaves_the_model_and_its_mode_alone(gpts, batches):
    dense = copy.deepcopy(gpts["relu"]).train()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = mc.convert(dense, mc.MoEConfig(num_experts=8, top_k=4, **SMALL, distill_steps=0),
                     calibration_data=batches, progress=False)
    assert dense.training and moe.training
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
