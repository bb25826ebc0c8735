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
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM",  # number multipliers on the gate and down projection
                  dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
                       mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16, mlp_multipliers=[0.7, 1.3]),
                  "Linear(gate) -> silu * Linear(up) -> Linear(down) (constant scales folded)"),
    "apertus": ("ApertusConfig", "ApertusForCausalLM",  # xIELU, an activation with learned scalars
                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2), "Linear -> XIELUActivation (learned) -> Linear"),
}
# family -> (config class, model class, config fields, expected pattern): a norm of the hidden vector before down
HIDDEN_NORMS = {
    "bitnet": ("BitNetConfig", "BitNetForCausalLM",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2), "Linear(gate) -> relu2 * Linear(up) -> BitNetRMSNorm -> Linear(down)"),
    "dory": ("DoryConfig", "DoryForCausalLM",  # nGPT: per-channel scales on gate and up, an L2 norm
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
             "Linear(gate) -> silu * Linear(up) -> DoryL2Norm -> Linear(down) (constant scales folded)"),
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


@pytest.mark.parametrize("family", HIDDEN_NORMS)
def test_a_hidden_norm_is_upcycled_exactly_and_not_split(family):
    config_class, model_class, fields, pattern = HIDDEN_NORMS[family]
    torch.manual_seed(0)
    dense = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, **SMALL)).eval()
    with torch.no_grad():  # scales and norm weights away from their initial ones
        for name, p in dense.named_parameters():
            if p.dim() == 1 and "mlp" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=2), example_inputs=ids)
    assert [site.pattern for site in moe.moe_report.converted] == [pattern] * 2, moe.moe_report.table()
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5
    with pytest.raises(moe_compile.MoECompileError, match="cannot split model.layers.0.mlp into experts: its hidden"):
        moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=ids)


# family -> (config class, model class, config fields): the whole-model torch.export graph holds no FFN (Longformer's
# attention fails it on a data-dependent guard; Reformer runs its layers inside an autograd Function), so the FFNs
# are located from the module calls of one forward
LOCATED_BY_CALLS = {
    "longformer": ("LongformerConfig", "LongformerForMaskedLM",
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        attention_window=[4, 4], max_position_embeddings=64)),
    "reformer": ("ReformerConfig", "ReformerModelWithLMHead",
                 dict(hidden_size=64, feed_forward_size=128, num_attention_heads=2, attention_head_size=32,
                      attn_layers=["local", "lsh"], axial_pos_embds=False, max_position_embeddings=64,
                      local_attn_chunk_length=8, lsh_attn_chunk_length=8, num_buckets=4, is_decoder=True)),
}


@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, top_k=2), MoEConfig(num_experts=4, top_k=4,
                                                                                  experts="split")])
@pytest.mark.parametrize("family", LOCATED_BY_CALLS)
def test_ffns_torch_export_cannot_see_are_located_from_module_calls(family, config):
    config_class, model_class, fields = LOCATED_BY_CALLS[family]
    torch.manual_seed(0)
    dense = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, **SMALL)).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    moe = moe_compile.convert(dense, config, example_inputs=ids)
    assert len(moe.moe_report.converted) == 2, moe.moe_report.table()
    assert all("located from the module calls of one forward" in s.reason for s in moe.moe_report.converted)
    with torch.no_grad(), torch.random.fork_rng():  # Reformer's LSH draws random rotations at every call
        torch.manual_seed(0)
        expected = dense(ids).logits
        torch.manual_seed(0)
        assert (moe(ids).logits - expected).abs().max().item() <= 1e-5
