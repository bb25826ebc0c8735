"""export takes the example a user has (any batch and sequence, positional or keyword inputs) and writes every
output the model returns, named after its field; check_parity compares every output; bad examples and paths get
errors that name the problem."""

from __future__ import annotations

import onnx
import pytest
import torch

import moe_compile
from moe_compile import MoEConfig, MoECompileError

from ..conftest import VOCAB, make_dense_model

transformers = pytest.importorskip("transformers")


def ids(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    return moe_compile.convert(transformers.GPT2Model(config).eval(), MoEConfig(num_experts=4, upcycle_noise=0.3))


@pytest.fixture(scope="module")
def bert_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB)
    return moe_compile.convert(transformers.BertModel(config).eval(), MoEConfig(num_experts=4, upcycle_noise=0.3))


def test_gpt2_model_exports_its_last_hidden_state_from_a_batch_one_example(gpt2_model, tmp_path):
    moe_compile.export(gpt2_model, ids((1, 1)), tmp_path / "m.onnx", target="ort")
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [o.name for o in graph.output] == ["last_hidden_state"] and [i.name for i in graph.input] == ["input_ids"]
    parity = moe_compile.check_parity(gpt2_model, tmp_path / "m.onnx", ids((3, 37), seed=1))
    assert parity.passed and [o.name for o in parity.outputs] == ["last_hidden_state"], parity.table()


def test_bert_model_exports_keyword_inputs_and_every_output(bert_model, tmp_path):
    example = {"input_ids": ids((1, 1)), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    moe_compile.export(bert_model, example, tmp_path / "m.onnx", target="portable")
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    mask = torch.ones(3, 37, dtype=torch.long)
    mask[1, 30:] = 0
    check = {"input_ids": ids((3, 37)), "attention_mask": mask}
    parity = moe_compile.check_parity(bert_model, tmp_path / "m.onnx", check)
    assert parity.passed and [o.name for o in parity.outputs] == ["last_hidden_state", "pooler_output"]


def test_embedding_inputs_convert_and_export(tmp_path):
    dense = make_dense_model("hf-llama")
    embeds = dense.model.embed_tokens(ids((1, 1))).detach()
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"),
                              example_inputs={"inputs_embeds": embeds})
    moe_compile.export(moe, {"inputs_embeds": embeds}, tmp_path / "m.onnx")
    check = {"inputs_embeds": dense.model.embed_tokens(ids((3, 37))).detach()}
    assert moe_compile.check_parity(moe, tmp_path / "m.onnx", check).passed


@pytest.mark.parametrize("example, match", [
    (ids((2, 8)).float(), r"'input_ids' is float32, but GPT2Model.forward's 'input_ids' takes integer token ids"),
    (ids((8,)), r"'input_ids' has shape \[8\], but every input must be \[batch, seq, \.\.\.\]"),
])
def test_wrong_examples_name_the_expected_input(gpt2_model, example, match):
    with pytest.raises(MoECompileError, match=match):
        moe_compile.export(gpt2_model, example, "unused.onnx")


def test_an_example_the_model_rejects_says_what_it_was_given(tmp_path):
    model = make_dense_model("nanogpt")
    with pytest.raises(MoECompileError, match=r"NanoGPT fails on the example inputs \(idx int64 \[2, 8\]\): Index"):
        moe_compile.export(model, torch.full((2, 8), 10 ** 6), tmp_path / "m.onnx")


@pytest.mark.parametrize("path, match", [("no/such/dir/m.onnx", "does not exist"), (".", "is a directory")])
def test_an_unwritable_path_is_named(gpt2_model, path, match):
    with pytest.raises(MoECompileError, match=f"cannot write the ONNX file '{path}'.*{match}"):
        moe_compile.export(gpt2_model, ids((2, 8)), path)


@torch.library.custom_op("moe_compile_test::halve", mutates_args=())
def _halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


@_halve.register_fake
def _(x):
    return torch.empty_like(x)


class ModelWithAnOpOnnxLacks(torch.nn.Module):
    """An MLP followed by a custom op that has no ONNX translation: the dense model does not export either."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return _halve(self.down(torch.relu(self.up(x))))


def test_an_export_failure_outside_the_moe_layers_says_the_dense_model_fails_too(tmp_path):
    moe = moe_compile.convert(ModelWithAnOpOnnxLacks().eval(), MoEConfig(num_experts=4, top_k=4, experts="split"))
    with pytest.raises(moe_compile.LoweringError, match=r"torch.onnx cannot export this model with dynamic axes .*"
                                                        r"halve.*MoE layers are not the cause.*dense model does not"):
        moe_compile.export(moe, torch.randn(2, 5, 16), tmp_path / "m.onnx")
