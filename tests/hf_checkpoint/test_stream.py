"""convert_hf_checkpoint: a dense checkpoint converted one layer at a time equals convert + save_hf, tensor for
tensor; damaged or unsupported sources get clear errors; `moe-compile convert --format hf` runs it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_compile as mc
from moe_compile.cli import main

from .conftest import checkpoint_tensors, make_dense

CONFIGS = {
    "llama-upcycle-noise": ("llama", mc.MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.3, seed=5)),
    "qwen2-split-kmeans": ("qwen2", mc.MoEConfig(num_experts=4, top_k=2, experts="split", combine="weighted",
                                                 normalize=False)),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_streamed_conversion_equals_convert_then_save_hf(case, tmp_path):
    family, config = CONFIGS[case]
    dense = make_dense(family, num_hidden_layers=3)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards, with an index
    assert (tmp_path / "dense" / "model.safetensors.index.json").is_file()

    streamed = mc.convert_hf_checkpoint(tmp_path / "dense", tmp_path / "streamed", config)
    mc.save_hf(mc.convert(dense, config), tmp_path / "in_memory")

    a, b = checkpoint_tensors(tmp_path / "streamed"), checkpoint_tensors(tmp_path / "in_memory")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == \
            json.loads((tmp_path / "in_memory" / name).read_text())
    assert streamed.layers == 3 and streamed.shards == 4 and "generation_config.json" in streamed.copied


def test_damaged_or_unsupported_sources_are_refused(tmp_path, hf_gpt2):
    config = mc.MoEConfig(num_experts=4)
    with pytest.raises(mc.HFCheckpointError, match="is not a directory"):
        mc.convert_hf_checkpoint(tmp_path / "nowhere", tmp_path / "out", config)

    (tmp_path / "not_a_config").mkdir()
    (tmp_path / "not_a_config" / "config.json").write_text('{"model_type": "no_such_model"}')
    with pytest.raises(mc.HFCheckpointError, match="is not a transformers config"):
        mc.convert_hf_checkpoint(tmp_path / "not_a_config", tmp_path / "out", config)

    dense = make_dense("llama")
    dense.save_pretrained(tmp_path / "bin", safe_serialization=True)
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(mc.HFCheckpointError, match="holds no model.safetensors"):
        mc.convert_hf_checkpoint(tmp_path / "bin", tmp_path / "out", config)

    dense.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    next((tmp_path / "sharded").glob("model-*.safetensors")).unlink()
    with pytest.raises(mc.HFCheckpointError, match="lists shards that are not in"):
        mc.convert_hf_checkpoint(tmp_path / "sharded", tmp_path / "out", config)

    dense.save_pretrained(tmp_path / "no_up")
    weights = load_file(tmp_path / "no_up" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "no_up" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mc.HFCheckpointError, match=r"decoder layer 1 .*\(missing: \['model.layers.1.mlp.up_proj"):
        mc.convert_hf_checkpoint(tmp_path / "no_up", tmp_path / "out", config)

    dense.save_pretrained(tmp_path / "ok")
    with pytest.raises(mc.HFCheckpointError, match="expert_choice"):
        mc.convert_hf_checkpoint(tmp_path / "ok", tmp_path / "out",
                                 mc.MoEConfig(num_experts=4, routing="expert_choice"))
    with pytest.raises(ValueError, match="not divisible by 3"):
        mc.convert_hf_checkpoint(tmp_path / "ok", tmp_path / "out", mc.MoEConfig(num_experts=3, experts="split",
                                                                                 combine="weighted"))
    hf_gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(mc.HFCheckpointError, match="from LLaMA, Mistral and Qwen2 models; this one is 'gpt2'"):
        mc.convert_hf_checkpoint(tmp_path / "gpt2", tmp_path / "out", config)

    settings = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 1}))
    with pytest.raises(mc.HFCheckpointError,
                       match="belongs to decoder layer 1, but the config has num_hidden_layers=1"):
        mc.convert_hf_checkpoint(tmp_path / "ok", tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_cli_convert_format_hf(tmp_path, capsys):
    make_dense("mistral").save_pretrained(tmp_path / "dense")
    assert main(["convert", "--hf", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--format", "hf",
                 "--num-experts", "4"]) == 0
    assert "MixtralForCausalLM: 2 MoE layers x 4 experts (top-2), 3 shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 4

    assert main(["convert", "--example", "nanogpt", "--out", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert "--format hf converts a local LLaMA, Mistral or Qwen2 checkpoint" in capsys.readouterr().err
    assert main(["convert", "--hf", str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--format", "hf",
                 "--routing", "expert_choice"]) == 2
    assert "moe-compile: error: convert_hf_checkpoint: cannot write MixtralForCausalLM" in capsys.readouterr().err
