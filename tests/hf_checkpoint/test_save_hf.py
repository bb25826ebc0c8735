"""save_hf: converted LLaMA / Mistral / Qwen2 models load in transformers as Mixtral / Qwen2-MoE with the same
logits (fp32, <= 1e-5); what the architectures cannot express is refused with the reason."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import moe_compile as mc
from moe_compile.moe.shared import SharedExpert

from ..conftest import VOCAB
from .conftest import checkpoint_tensors, hf_logits, make_dense, transformers

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))

CASES = {  # name: (family, dense config overrides, MoEConfig, architecture, expected class)
    "llama-upcycle-top2": ("llama", {}, mc.MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.5), None,
                           "MixtralForCausalLM"),
    "llama-split-weighted": ("llama", {}, mc.MoEConfig(num_experts=4, top_k=2, experts="split", combine="weighted"),
                             None, "MixtralForCausalLM"),
    "mistral-sliding-top1": ("mistral", {"sliding_window": 6}, mc.MoEConfig(num_experts=4, top_k=1,
                                                                           upcycle_noise=0.5), None,
                             "MixtralForCausalLM"),
    "qwen2-softmax-gates": ("qwen2", {}, mc.MoEConfig(num_experts=4, top_k=2, normalize=False, upcycle_noise=0.5),
                            None, "Qwen2MoeForCausalLM"),
    "qwen2-switch-dropless": ("qwen2", {"tie_word_embeddings": True},
                              mc.MoEConfig(num_experts=4, routing="switch", capacity_factor=4.0, upcycle_noise=0.5),
                              None, "Qwen2MoeForCausalLM"),
    "llama-as-qwen2moe-tied": ("llama", {"tie_word_embeddings": True}, mc.MoEConfig(num_experts=4, upcycle_noise=0.5),
                               "qwen2_moe", "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_loads_in_transformers_with_the_same_logits(case, tmp_path):
    family, overrides, config, architecture, expected = CASES[case]
    moe = mc.convert(make_dense(family, **overrides), config).eval()
    written = mc.save_hf(moe, tmp_path, architecture=architecture)

    name, logits = hf_logits(tmp_path, IDS)
    with torch.no_grad():
        ours = moe(IDS).logits
    assert name == expected == written.architecture
    assert (logits - ours).abs().max().item() <= 1e-5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    assert written.shards == 3 and written.layers == 2


def test_mixtral_tensors_are_the_experts_of_our_layer(tmp_path):
    moe = mc.convert(make_dense("llama"), mc.MoEConfig(num_experts=4, upcycle_noise=0.5))
    mc.save_hf(moe, tmp_path)
    tensors = checkpoint_tensors(tmp_path)
    layer = moe.model.layers[1].mlp
    prefix = "model.layers.1.block_sparse_moe"
    assert torch.equal(tensors[f"{prefix}.gate.weight"], layer.router.weight)
    assert torch.equal(tensors[f"{prefix}.experts.3.w1.weight"], layer.gate_weight[3])
    assert torch.equal(tensors[f"{prefix}.experts.3.w3.weight"], layer.up_weight[3])
    assert torch.equal(tensors[f"{prefix}.experts.3.w2.weight"], layer.down_weight[3])
    assert not any(".mlp." in name for name in tensors)


def test_shared_expert_is_written_exactly_into_qwen2_moe(tmp_path):
    """A layer's always-on shared expert (MoELayer.shared, added with weight 1) becomes Qwen2-MoE's shared expert:
    its sigmoid gate is 1/2 and its down projection doubled, so the block computes routed + shared exactly."""
    moe = mc.convert(make_dense("llama"), mc.MoEConfig(num_experts=4, upcycle_noise=0.5)).eval()
    generator = torch.Generator().manual_seed(3)
    for decoder in moe.model.layers:
        decoder.mlp.shared = SharedExpert(up_weight=torch.randn(32, 64, generator=generator) * 0.1, up_bias=None,
                                          down_weight=torch.randn(64, 32, generator=generator) * 0.1,
                                          activation="silu", gate_weight=torch.randn(32, 64, generator=generator) * 0.1)
    written = mc.save_hf(moe, tmp_path)  # a shared expert makes the LLaMA model a Qwen2-MoE (no q/k/v biases)
    assert written.architecture == "Qwen2MoeForCausalLM"

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.shared_expert_intermediate_size == 32
    x = torch.randn(2, 16, 64, generator=generator)
    with torch.no_grad():
        for i, decoder in enumerate(moe.model.layers):
            assert (hf.model.layers[i].mlp(x) - decoder.mlp(x)).abs().max().item() <= 1e-6
        assert (hf(IDS).logits - moe(IDS).logits).abs().max().item() <= 1e-5


def test_qwen2_moe_without_shared_expert_adds_nothing(tmp_path):
    moe = mc.convert(make_dense("qwen2"), mc.MoEConfig(num_experts=4, upcycle_noise=0.5)).eval()
    mc.save_hf(moe, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.shared_expert_intermediate_size == 0 and hf.config.norm_topk_prob
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        assert torch.equal(hf.model.layers[0].mlp.shared_expert(x), torch.zeros_like(x))
        assert (hf.model.layers[0].mlp(x) - moe.model.layers[0].mlp(x)).abs().max().item() <= 1e-6


def test_saving_again_replaces_the_shards_of_an_earlier_save(tmp_path):
    mc.save_hf(mc.convert(make_dense("llama", num_hidden_layers=3), mc.MoEConfig(num_experts=4)), tmp_path)
    mc.save_hf(mc.convert(make_dense("llama"), mc.MoEConfig(num_experts=4)), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors"
                                                                       for i in (1, 2, 3)]
    assert hf_logits(tmp_path, IDS)[0] == "MixtralForCausalLM"


def test_tokenizer_files_are_copied_from_the_source_directory(tmp_path):
    dense = make_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text('{"version": "1.0"}')
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    written = mc.save_hf(mc.convert(loaded, mc.MoEConfig(num_experts=4)), tmp_path / "moe")
    assert sorted(written.copied) == ["generation_config.json", "tokenizer.json"]
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == '{"version": "1.0"}'


REFUSED = {  # name: (family, dense overrides, MoEConfig, architecture, words the message must contain)
    "expert-choice": ("llama", {}, mc.MoEConfig(num_experts=4, routing="expert_choice"), None, "expert_choice"),
    "capacity": ("llama", {}, mc.MoEConfig(num_experts=4, capacity_factor=1.25), None, "drop tokens"),
    "switch-capacity": ("llama", {}, mc.MoEConfig(num_experts=4, routing="switch"), None, "drop tokens"),
    "switch-unnormalised": ("llama", {}, mc.MoEConfig(num_experts=4, routing="switch", capacity_factor=4.0), None,
                            "renormalises"),
    "unweighted-top2": ("llama", {}, mc.MoEConfig(num_experts=4, experts="split"), None, "combine='unweighted'"),
    "mlp-bias": ("llama", {"mlp_bias": True}, mc.MoEConfig(num_experts=4), None, "biases"),
    "qwen2-as-mixtral": ("qwen2", {}, mc.MoEConfig(num_experts=4), "mixtral", "q/k/v"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_architecture_cannot_express_is_refused(case, tmp_path):
    family, overrides, config, architecture, words = REFUSED[case]
    with pytest.warns(UserWarning) if config.routing == "expert_choice" else contextlib.nullcontext():
        moe = mc.convert(make_dense(family, **overrides), config)
    with pytest.raises(mc.HFCheckpointError, match="moe_compile.save") as error:
        mc.save_hf(moe, tmp_path / "out", architecture=architecture)
    assert words in str(error.value)
    assert not (tmp_path / "out").exists()


def test_other_models_are_refused(tmp_path, hf_gpt2, nanogpt):
    with pytest.raises(mc.HFCheckpointError, match="LLaMA, Mistral and Qwen2 models; this one is 'gpt2'"):
        mc.save_hf(mc.convert(hf_gpt2, mc.MoEConfig(num_experts=4)), tmp_path)
    with pytest.raises(mc.HFCheckpointError, match="this one is not a transformers model"):
        mc.save_hf(mc.convert(nanogpt, mc.MoEConfig(num_experts=4)), tmp_path)
    with pytest.raises(mc.HFCheckpointError, match="Convert a LLaMA"):
        mc.save_hf(make_dense("llama"), tmp_path)
    with pytest.raises(mc.HFCheckpointError, match="unknown architecture 'deepseek'. Choose one of mixtral, qwen2_moe"):
        mc.save_hf(mc.convert(make_dense("llama"), mc.MoEConfig(num_experts=4)), tmp_path, architecture="deepseek")



def test_layers_kept_dense_are_qwen2_moe_mlp_only_layers(tmp_path):
    """A per-layer plan (optimize's): layer 0 dense, layer 1 MoE, written as Qwen2-MoE with mlp_only_layers=[0];
    Mixtral, whose layers are all sparse, is refused with the reason."""
    config = mc.MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.5)
    moe = mc.convert(make_dense("llama"), config, layer_configs={"model.layers.0.mlp": None}).eval()
    written = mc.save_hf(moe, tmp_path / "plan")
    name, logits = hf_logits(tmp_path / "plan", IDS)
    with torch.no_grad():
        ours = moe(IDS).logits
    assert name == "Qwen2MoeForCausalLM" and written.layers == 1
    assert json.loads((tmp_path / "plan" / "config.json").read_text())["mlp_only_layers"] == [0]
    assert (logits - ours).abs().max().item() <= 1e-5
    with pytest.raises(mc.HFCheckpointError, match=r"decoder layers \[0\] stay dense"):
        mc.save_hf(moe, tmp_path / "mixtral", architecture="mixtral")
