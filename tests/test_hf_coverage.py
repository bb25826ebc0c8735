"""A slice of the coverage sweep (benchmarks/hf_coverage.py): tiny configs come from generic shrinking, and one
architecture runs through the whole check. The full sweep is a benchmark, not a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("hf_coverage",
                                               Path(__file__).parents[1] / "benchmarks" / "hf_coverage.py")
hf_coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_coverage)


@pytest.mark.parametrize("model_type, fields", [
    ("bert", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    ("t5", dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16)),
    ("gpt2", dict(n_embd=64, n_layer=2, n_head=4)),
    ("distilbert", dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4)),
])
def test_shrink_finds_each_familys_own_names(model_type, fields):
    config = hf_coverage.shrink(transformers.AutoConfig.for_model(model_type))
    assert {name: getattr(config, name) for name in fields} == fields


def test_one_architecture_runs_through_the_check():
    row = hf_coverage.run_one("causal-lm", "gpt_neox", "GPTNeoXForCausalLM")
    assert row["status"] == "converted" and row["sites"] == 2, row
    assert all(error <= hf_coverage.TOLERANCE for error in row["max_scaled_error"].values())


def test_unset_head_sizes_get_tiny_ones():
    """Ministral reads config.head_dim and Nemotron config.num_key_value_heads with no default of their own."""
    assert hf_coverage.shrink(transformers.AutoConfig.for_model("ministral")).head_dim == hf_coverage.TINY["head_dim"]
    assert hf_coverage.shrink(transformers.AutoConfig.for_model("nemotron")).num_key_value_heads == \
        hf_coverage.TINY["kv_heads"]


@pytest.mark.parametrize("model_type, moe", [("mixtral", True), ("switch_transformers", True), ("llama", False),
                                                 ("doge", False), ("dbrx", True)])
def test_moe_models_are_known_by_their_config(model_type, moe):
    assert hf_coverage.is_moe_config(transformers.AutoConfig.for_model(model_type)) is moe


def test_an_encoder_decoder_without_decoder_ids_gets_the_encoders():
    """Pegasus' dummy inputs hold no decoder ids, and its decoder refuses to run without them."""
    row = hf_coverage.run_one("seq2seq", "pegasus", "PegasusForConditionalGeneration")
    assert row["status"] == "converted", row


def test_a_mamba2_mixer_keeps_its_inner_width():
    """Its heads x head size is expand x hidden_size by default, and must stay so (the mixer reshapes by it)."""
    config = hf_coverage.shrink(transformers.AutoConfig.for_model("mamba2"))
    assert config.num_heads * config.head_dim == config.expand * config.hidden_size


def test_state_space_models_are_counted_apart():
    row = hf_coverage.run_one("causal-lm", "mamba", "MambaForCausalLM")
    assert row["status"] == "no FFN", row


def test_two_layers_keep_every_layer_type():
    """NeoMME's first full-attention layer comes after sliding ones; Zamba2's layer ids follow the layers kept."""
    assert set(hf_coverage.shrink(transformers.AutoConfig.for_model("neomme")).layer_types) == \
        {"sliding_attention", "full_attention"}
    config = hf_coverage.shrink(transformers.AutoConfig.for_model("zamba2"))
    assert config.layers_block_type == ["linear_attention", "hybrid"] and config.hybrid_layer_ids == [1]


def test_sizes_tied_to_the_width_stay_tied():
    reformer = hf_coverage.shrink(transformers.AutoConfig.for_model("reformer"))
    assert sum(reformer.axial_pos_embds_dim) == reformer.hidden_size
    mobilebert = hf_coverage.shrink(transformers.AutoConfig.for_model("mobilebert"))
    assert mobilebert.embedding_size < mobilebert.hidden_size
    falcon = hf_coverage.shrink(transformers.AutoConfig.for_model("falcon_h1"))
    assert falcon.mamba_d_ssm == falcon.mamba_n_heads * falcon.mamba_d_head


def test_a_width_a_sibling_names_stays_that_multiple():
    """BLT's local encoder and decoder name the global transformer's width, hidden_size_global = cross_attn_k x their
    own: the global sub-config keeps that multiple of the tiny width."""
    config = hf_coverage.shrink(transformers.AutoConfig.for_model("blt"))
    local = config.encoder_config.hidden_size
    assert config.global_config.hidden_size == config.cross_attn_k * local == config.decoder_config.hidden_size_global
    assert config.patcher_config.hidden_size == local == hf_coverage.TINY["width"]


def test_a_layer_type_placed_by_a_period_keeps_two_layers():
    """Zamba's hybrid layers (attn_layer_period) share one attention block: with one, its tied weights tie nothing."""
    config = hf_coverage.shrink(transformers.AutoConfig.for_model("zamba"))
    assert config.layers_block_type == ["linear_attention", "hybrid", "hybrid"] and config.num_hidden_layers == 3


def test_a_model_that_adds_audio_to_every_token_gets_audio_features():
    """VoxtralRealtime sets audio_length_per_tok and refuses ids alone; Voxtral reads ids alone."""
    ids = torch.zeros(3, 5, dtype=torch.long)
    realtime = hf_coverage.shrink(transformers.AutoConfig.for_model("voxtral_realtime"))
    frames = 5 * realtime.audio_length_per_tok
    assert hf_coverage.per_token_audio(realtime, ids).shape == (3, realtime.audio_config.num_mel_bins, frames)
    assert hf_coverage.per_token_audio(hf_coverage.shrink(transformers.AutoConfig.for_model("voxtral")), ids) is None


def test_a_vocabulary_as_wide_as_the_tiny_model_is_not_kept():
    """ESM-C's vocabulary (64) is the tiny width: its LM head d -> vocab would look like a square FFN."""
    config = hf_coverage.shrink(transformers.AutoConfig.for_model("esmc"))
    assert config.hidden_size == hf_coverage.TINY["width"] and config.vocab_size == hf_coverage.TINY["vocab"]
