"""Shared fixtures: tiny dense models built in code (no downloads), in eval mode, fp32.

Biases are filled with seeded random values (the models' own initialisers leave them at zero), so that a bias
added twice, or not at all, shows in the logits. Fixtures are session-scoped: tests must not change them
(`convert` copies the model unless inplace=True; a test that needs to mutate one takes `copy.deepcopy`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU; triton reads this when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `dev.py test` runs a worker per core: the cores shared among them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from moe_compile.example_models import build_example
from moe_compile.example_text import stdlib_text

VOCAB = 128
DENSE_MODELS = ("nanogpt", "nanogpt-inline", "hf-gpt2", "hf-llama")


def _randomize_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def make_hf_gpt2(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.05)
    return _randomize_biases(transformers.GPT2LMHeadModel(config), seed).eval()


def make_hf_llama(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      initializer_range=0.05)
    return transformers.LlamaForCausalLM(config).eval()


def make_dense_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny dense model by name (one of DENSE_MODELS), eval mode, fp32."""
    if name == "hf-gpt2":
        return make_hf_gpt2(seed)
    if name == "hf-llama":
        return make_hf_llama(seed)
    return _randomize_biases(build_example(name, seed=seed, vocab_size=VOCAB), seed).eval()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of an embedded example (returns a tensor) or a transformers model (returns an output object)."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="session")
def hf_gpt2() -> torch.nn.Module:
    """transformers GPT2LMHeadModel, 2 layers, d_model 64, vocab 128 (Conv1D FFN, gelu_new)."""
    return make_hf_gpt2()


@pytest.fixture(scope="session")
def hf_llama() -> torch.nn.Module:
    """transformers LlamaForCausalLM, 2 layers, d_model 64, d_ff 128, vocab 128 (gated SwiGLU FFN)."""
    return make_hf_llama()


@pytest.fixture(scope="session")
def nanogpt() -> torch.nn.Module:
    return make_dense_model("nanogpt")


@pytest.fixture(scope="session")
def nanogpt_inline() -> torch.nn.Module:
    return make_dense_model("nanogpt-inline")


@pytest.fixture(scope="session")
def dense_models(nanogpt, nanogpt_inline, hf_gpt2, hf_llama) -> dict[str, torch.nn.Module]:
    return {"nanogpt": nanogpt, "nanogpt-inline": nanogpt_inline, "hf-gpt2": hf_gpt2, "hf-llama": hf_llama}


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    """[2, 16] token ids, seeded."""
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1234))


def save_hf_llama_with_tokenizer(directory: Path) -> None:
    """A tiny LLaMA and a word-level tokenizer of the standard library's words, saved as transformers saves them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = dict.fromkeys(stdlib_text("train").decode().split())
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(list(words)[:VOCAB - 1])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    make_dense_model("hf-llama").save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
