"""New model families work without new code: every causal-LM family below is built from a tiny random config,
its FFNs are found by graph pattern, and split experts with all experts active reproduce its logits."""

from __future__ import annotations

import pytest
import torch

import moe_compile
from moe_compile import MoEConfig

from ..conftest import VOCAB

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=VOCAB)
# family -> (config class, model class, config fields, expected pattern of every site)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4), "Conv1D -> gelu_tanh -> Conv1D"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
             "Linear -> gelu_tanh -> Linear"),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global"], 2]]),
                "Linear -> gelu_tanh -> Linear"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                 "Linear -> gelu -> Linear"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4),
              "Linear -> gelu_tanh -> Linear"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
               "FalconLinear -> gelu -> FalconLinear"),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            "Linear -> gelu_tanh -> Linear"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
            "Linear -> relu -> Linear"),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), "Linear(gate) -> silu * Linear(up) -> Linear(down)"),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2), "Linear(gate) -> silu * Linear(up) -> Linear(down)"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), "Linear(gate) -> silu * Linear(up) -> Linear(down)"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",  # gate and up fused in one projection, chunked
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0),
             "Linear(gate half) -> silu * Linear(up half) -> Linear(down)"),
    "arcee": ("ArceeConfig", "ArceeForCausalLM",  # squared ReLU
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), "Linear -> relu2 -> Linear"),
    "big_bird": ("BigBirdConfig", "BigBirdForCausalLM",  # sibling modules, gelu_new: several ATen ops
                 dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      attention_type="original_full", is_decoder=True), "Linear -> gelu_tanh -> Linear"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16), "Linear(gate) -> gelu_tanh * Linear(up) -> Linear(down)"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_found_and_converted_exactly(family):
    config_class, model_class, fields, pattern = FAMILIES[family]
    torch.manual_seed(0)
    dense = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, **SMALL)).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=ids)
    converted = moe.moe_report.converted
    assert len(converted) == 2  # one per layer
    assert all(site.pattern.removesuffix(" -> Dropout") == pattern for site in converted), moe.moe_report.table()
    with torch.no_grad():
        error = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert error <= 1e-5
