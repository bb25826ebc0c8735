"""Property-based tests (hypothesis): random MoEConfigs x models x shapes x routings x expert builders, against the
invariants every conversion must keep.

    upcycled experts with renormalised gates, dropless        = the dense model
    split experts with every expert active (k = E), dropless  = the dense model
    dropless token choice / switch                            causal; batch- and left-padding-invariant; decoding
                                                              through the KV cache = recomputing the whole sequence
    every export (portable, and ort where it lowers)          = eager, at another shape, on repeated token ids
    save / load                                               bit-equal

The example counts follow the hypothesis profile: "ci" (default) keeps the suite within a few minutes;
HYPOTHESIS_PROFILE=nightly runs 200+ cases per property.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import moe_compile
from moe_compile import MoEConfig
from moe_compile.export.decoder import returned_cache
from moe_compile.export.ort_moe import ort_unsupported_reason
from moe_compile.moe import iter_moe_layers

from .conftest import VOCAB, logits_of, make_dense_model

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))

MODELS = ("nanogpt", "hf-gpt2", "hf-llama", "gpt-runtime-mask")  # the last: blocks captured with torch.export
_DENSE: dict[str, torch.nn.Module] = {}


def dense(name: str) -> torch.nn.Module:
    if name not in _DENSE:
        _DENSE[name] = make_dense_model(name)
    return _DENSE[name]


@st.composite
def configs(draw) -> dict:
    # weighted towards the configurations with an exact invariant (dropless token choice, k = E, no noise)
    routing = draw(st.sampled_from(("switch", "token_choice", "token_choice", "expert_choice")))
    experts = draw(st.sampled_from(("upcycle", "split")))
    num_experts = draw(st.sampled_from((2, 4, 8)))
    fields = dict(routing=routing, experts=experts, num_experts=num_experts, seed=draw(st.integers(0, 3)))
    if routing != "switch":
        fields["top_k"] = draw(st.one_of(st.just(num_experts), st.integers(1, num_experts)))
    if routing == "token_choice":
        fields["capacity_factor"] = draw(st.sampled_from((None, None, None, 0.5, 1.0, 2.0)))
        fields["normalize"] = draw(st.sampled_from((True, True, False)))
    else:
        fields["capacity_factor"] = draw(st.sampled_from((0.5, 1.0, 1.25, float(num_experts))))
    fields["combine"] = draw(st.sampled_from((None, "weighted", "unweighted")))
    if experts == "upcycle":
        fields["upcycle_noise"] = draw(st.sampled_from((0.0, 0.0, 0.5)))
    return fields


def convert(model_name: str, fields: dict) -> torch.nn.Module:
    captured = model_name.startswith("gpt-runtime-mask")  # torch.fx cannot trace its blocks: they are captured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice's causality warning
        return moe_compile.convert(dense(model_name), MoEConfig(**fields),
                                   example_inputs=torch.zeros(1, 1, dtype=torch.long) if captured else None)


def token_ids(batch: int, seq: int, seed: int, repeat: bool) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    if repeat:  # real text repeats tokens: equal ids give equal router scores where the FFN sees embeddings
        ids[:, seq // 2:] = ids[:, :seq - seq // 2].clone()
    return ids


def dropless_token_routing(model) -> bool:
    layers = [layer for _, layer in iter_moe_layers(model)]
    return all(layer.router.routing != "expert_choice" and (
        layer.router.capacity_factor is None or layer.router.capacity_factor * layer.router.top_k >=
        layer.router.num_experts) for layer in layers)


shapes = st.tuples(st.integers(1, 3), st.integers(2, 12))


@given(model_name=st.sampled_from(MODELS), fields=configs(), shape=shapes, seed=st.integers(0, 100))
@settings(max_examples=2 * settings.default.max_examples)
def test_eager_invariants(model_name, fields, shape, seed):
    model = convert(model_name, fields)
    config = model.moe_report.config
    ids = token_ids(*shape, seed, repeat=bool(seed % 2))
    with torch.no_grad():
        moe_logits, dense_logits = logits_of(model, ids), logits_of(dense(model_name), ids)
    dropless = dropless_token_routing(model)
    gates_sum_to_one = (config.combine == "weighted" and config.normalize) or \
        (config.combine == "unweighted" and config.top_k == 1)
    exact = dropless and ((config.experts == "upcycle" and config.upcycle_noise == 0 and gates_sum_to_one) or (
        config.experts == "split" and config.top_k == config.num_experts and config.combine == "unweighted"))
    hypothesis.event("exact (= dense)" if exact else "dropless" if dropless else "may drop or not causal")
    if exact:
        assert (moe_logits - dense_logits).abs().max() <= 1e-5
    if dropless:
        with torch.no_grad():
            alone = logits_of(model, ids[:1])
            assert (alone - moe_logits[:1]).abs().max() <= 1e-5  # batch-invariant
            if ids.shape[1] > 2:  # causal: position t does not see later tokens
                changed = ids[:1].clone()
                changed[0, -1] = (changed[0, -1] + 1) % VOCAB
                assert (logits_of(model, changed)[:, :-1] - alone[:, :-1]).abs().max() <= 1e-5


@given(fields=configs(), shape=shapes, seed=st.integers(0, 100))
@settings(max_examples=max(10, settings.default.max_examples // 2))
def test_left_padding_invariance_with_dropless_routing(fields, shape, seed):
    """An HF model with an attention mask: a left-padded sequence gives its unpadded logits at its positions."""
    fields = {**fields, "routing": "token_choice", "capacity_factor": None,
              "top_k": min(fields.get("top_k", 1), fields["num_experts"])}
    model = convert("hf-llama", fields)
    ids = token_ids(1, shape[1], seed, repeat=True)
    pad = shape[0]
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask, position_ids=positions).logits[:, pad:]
    assert (left - alone).abs().max() <= 1e-4


def decode_through_cache(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the model's KV cache (a transformers cache, or the hand-written GPT's (keys, values)
    tuples): (the logits of every position, prompt and decoded tokens)."""
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        out = model(ids, use_cache=True)
        logits, cache = out.logits, returned_cache(out)
        argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step_call = lambda token, cache: model(token, **{argument: cache}, use_cache=True)  # noqa: E731
        read = lambda out: (out.logits, returned_cache(out))  # noqa: E731
    else:
        logits, cache = model(ids, use_cache=True)
        step_call = lambda token, cache: model(token, past=cache, use_cache=True)  # noqa: E731
        read = lambda out: out  # noqa: E731
    every, tokens = [logits], ids
    for _ in range(steps):
        token = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, token], 1)
        logits, cache = read(step_call(token, cache))
        every.append(logits)
    return torch.cat(every, 1), tokens


@given(model_name=st.sampled_from(("hf-llama", "gpt-runtime-mask")), fields=configs(), shape=shapes,
       seed=st.integers(0, 100))
@settings(max_examples=max(5, settings.default.max_examples // 3))
def test_decoding_through_the_cache_equals_recomputing_the_sequence(model_name, fields, shape, seed):
    """The blocks take calls with a KV cache as well as the call convert recorded (captured blocks capture that
    kind of call on first use), and a dropless routing routes each token alone, so the cached steps are exact."""
    fields = {**fields, "routing": "token_choice", "capacity_factor": None,
              "top_k": min(fields.get("top_k", 1), fields["num_experts"])}
    model = convert(model_name, fields)
    ids = token_ids(*shape, seed, repeat=True)
    with torch.no_grad():
        cached, tokens = decode_through_cache(model, ids, steps=3)
        whole = logits_of(model, tokens)
    assert (cached - whole).abs().max() <= 1e-4


@pytest.mark.parametrize("target", ("portable", "ort"))  # two tests, so that test workers share the exports
@given(model_name=st.sampled_from(MODELS), fields=configs(), seed=st.integers(0, 100))
@settings(max_examples=settings.default.max_examples // 2)  # 12 + 12 exports in CI, 100 + 100 nightly
def test_every_export_equals_eager_at_another_shape(tmp_path_factory, target, model_name, fields, seed):
    model = convert(model_name, fields)
    path = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    report = moe_compile.export(model, (token_ids(2, 6, seed, repeat=False),), path, target=target)
    lowered = {layer.lowering for layer in report.layers}
    hypothesis.event(f"{target}: {' + '.join(sorted(lowered))}")
    if target == "ort" and all(ort_unsupported_reason(layer) is None for _, layer in iter_moe_layers(model)):
        assert lowered == {"com.microsoft.MoE"}
    parity = moe_compile.check_parity(model, path, (token_ids(3, 11, seed + 1, repeat=True),))
    assert parity.passed, parity.table()


@given(model_name=st.sampled_from(MODELS), fields=configs())
@settings(max_examples=max(5, settings.default.max_examples // 3))
def test_save_load_round_trip_is_bit_equal(tmp_path_factory, model_name, fields):
    model = convert(model_name, fields)
    directory = moe_compile.save(model, tmp_path_factory.mktemp("saved"))
    loaded = moe_compile.load(directory)
    ids = token_ids(2, 7, 0, repeat=True)
    with torch.no_grad():
        assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
