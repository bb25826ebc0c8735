"""Tiny dense LLaMA, Mistral and Qwen2 models (random weights, fp32, eval) and helpers to compare checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import VOCAB

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, initializer_range=0.05)


def make_dense(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """family: llama | mistral | qwen2; overrides go to the config."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SIZES, **overrides})).eval()
    with torch.no_grad():  # q/k/v biases (Qwen2) start at zero; random ones show if they are lost
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def hf_logits(directory: Path, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(class name, logits) of the checkpoint in `directory`, loaded by transformers' AutoModelForCausalLM."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(ids).logits


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(directory).glob("model-*.safetensors")):
        tensors.update(load_file(path))
    return tensors
