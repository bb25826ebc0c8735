"""FFNs inside blocks that torch.fx cannot trace, located with one whole-model torch.export (passes/locate.py) and
rewritten as a module chain, or by capturing the block with torch.export."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_compile
from moe_compile import MoEConfig, MoELayer, NoFFNFoundError
from moe_compile.passes.captured import CapturedBlock

from ..conftest import VOCAB


def make_opt() -> nn.Module:
    """Hugging Face OPT: fc1 -> activation_fn -> fc2 inline in OPTDecoderLayer, whose forward fx cannot trace."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, vocab_size=VOCAB, init_std=0.05)
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so that a bias added twice or dropped shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def opt():
    return make_opt()


def ids(shape=(2, 8), seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


class UntraceableBlock(nn.Module):
    """Branches on a shape (torch.fx cannot turn a traced value into a bool), then runs an FFN inline."""

    def __init__(self, style: str = "module_act"):
        super().__init__()
        self.style = style
        self.up = nn.Linear(16, 32)
        self.gate = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        a, b = (x, 2 * x) if x.shape[-1] == 16 else (x, x)
        if self.style == "module_act":
            h = self.act(self.up(a))
        elif self.style == "functional_act":
            h = F.gelu(self.up(a))
        elif self.style == "gated":
            h = F.silu(self.gate(a)) * self.up(a)
        else:  # "act_used_twice"
            return b + self.down(self.act(self.up(a))) + self.act(b)
        return b + self.down(h)


def block_model(style: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(UntraceableBlock(style)).eval()


def features(shape=(2, 5), seed=0):
    return torch.randn(*shape, 16, generator=torch.Generator().manual_seed(seed))


def test_without_example_inputs_the_error_says_what_they_are_for():
    with pytest.raises(NoFFNFoundError, match=r"(?s)not traceable with torch.fx.*pass example_inputs: a sample of"):
        moe_compile.convert(block_model("module_act"), MoEConfig(num_experts=4))


@pytest.mark.parametrize("example_inputs", [None, ids((1, 1))])  # a transformers model brings its own
def test_opt_sites_are_located(opt, example_inputs):
    report = moe_compile.find_ffn_blocks(opt, example_inputs=example_inputs)
    found = [s for s in report.sites if s.action == "found"]
    assert [s.name for s in found] == ["model.decoder.layers.0:fc1..fc2", "model.decoder.layers.1:fc1..fc2"]
    assert all(s.pattern == "Linear -> relu -> Linear -> Dropout" and (s.d_model, s.d_ff) == (64, 128) for s in found)
    assert all("located with torch.export" in s.reason for s in found)


@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, top_k=2),  # upcycled, renormalised top-2
                                    MoEConfig(num_experts=4, top_k=4, experts="split")])  # split, k = E
def test_opt_conversion_is_exact_and_keeps_the_block(opt, config):
    moe = moe_compile.convert(opt, config)
    layer = moe.model.decoder.layers[0]
    assert type(layer).__name__ == "OPTDecoderLayer"
    assert isinstance(layer.fc1, MoELayer) and isinstance(layer.activation_fn, nn.Identity)
    assert isinstance(layer.fc2, nn.Identity)
    assert layer.fc1.dropout.p == 0.0  # OPTDecoderLayer's forward still applies its own dropout after fc2
    with torch.no_grad():
        error = (moe(ids((3, 11), seed=1)).logits - opt(ids((3, 11), seed=1)).logits).abs().max().item()
    assert error <= 1e-5
    assert isinstance(opt.model.decoder.layers[0].fc1, nn.Linear)  # the input model is untouched


def test_opt_exports_and_round_trips(opt, tmp_path):
    moe = moe_compile.convert(opt, MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.3))
    report = moe_compile.export(moe, ids(), tmp_path / "opt.onnx", target="ort")
    assert [layer.lowering for layer in report.layers] == ["com.microsoft.MoE"] * 2
    parity = moe_compile.check_parity(moe, tmp_path / "opt.onnx", ids((3, 13), seed=2))
    assert parity.passed, parity.table()

    moe_compile.save(moe, tmp_path / "saved")
    loaded = moe_compile.load(tmp_path / "saved")  # replays the search on the model's own example inputs
    with torch.no_grad():
        assert torch.equal(loaded(ids(seed=3)).logits, moe(ids(seed=3)).logits)


def test_a_module_chain_in_a_custom_block_is_rewritten():
    dense = block_model("module_act")
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=features())
    (site,) = moe.moe_report.converted
    assert site.name == "0:up..down" and "0.up is now the MoELayer" in site.reason
    torch.testing.assert_close(moe(features(seed=1)), dense(features(seed=1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["functional_act", "gated", "act_used_twice"])
def test_blocks_that_are_no_module_chain_are_captured(style):
    dense = block_model(style)
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=4, experts="split"), example_inputs=features())
    (site,) = moe.moe_report.converted
    assert site.name == "0:up..down" and site.reason == "rewrote 0's torch.export graph to call an MoELayer"
    assert isinstance(moe[0], CapturedBlock) and type(moe[0].source).__name__ == "UntraceableBlock"
    torch.testing.assert_close(moe(features((3, 7), seed=1)), dense(features((3, 7), seed=1)), rtol=0, atol=1e-5)


def test_an_ffn_whose_values_escape_is_skipped_with_the_reason():
    class Escaping(UntraceableBlock):
        def forward(self, x):
            a, b = (x, 2 * x) if x.shape[-1] == 16 else (x, x)
            hidden = torch.nn.functional.gelu(self.up(a))
            return b + self.down(hidden) + hidden.mean(-1, keepdim=True)

    torch.manual_seed(0)
    report = moe_compile.find_ffn_blocks(nn.Sequential(Escaping()), example_inputs=features())
    (site,) = report.sites
    assert site.action == "skipped" and "also used outside the FFN" in site.reason


def test_a_model_torch_export_refuses_is_reported():
    class DataDependent(UntraceableBlock):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: neither fx nor torch.export handle it
                x = -x
            return super().forward(x)

    torch.manual_seed(0)
    report = moe_compile.find_ffn_blocks(nn.Sequential(DataDependent()), example_inputs=features())
    assert any(note.outcome.startswith("torch.export failed") for note in report.notes)
    (site,) = report.sites  # its FFN is a chain of modules: found from the module calls instead
    assert site.name == "0:up..down" and site.reason == "located from the module calls of one forward"


class DataDependentBlock(nn.Module):
    """Branches on a tensor's value (torch.export cannot capture the model), then runs an FFN of modules; with
    read_hidden, the forward also reads the FFN's hidden activations itself, which module hooks cannot see."""

    def __init__(self, read_hidden: bool = False):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
        self.read_hidden = read_hidden

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        h = self.act(self.up(x))
        return x + self.down(h) + (h.mean(-1, keepdim=True) if self.read_hidden else 0)


def test_a_model_torch_export_cannot_capture_has_its_module_chains_located_from_its_calls():
    torch.manual_seed(0)
    dense = nn.Sequential(DataDependentBlock(), DataDependentBlock()).eval()
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=2), example_inputs=features())
    assert [s.name for s in moe.moe_report.converted] == ["0:up..down", "1:up..down"]
    assert all("located from the module calls of one forward" in s.reason for s in moe.moe_report.converted)
    assert any("torch.export failed" in note.outcome and "2 FFNs" in note.outcome for note in moe.moe_report.notes)
    torch.testing.assert_close(moe(features(seed=1)), dense(features(seed=1)), rtol=0, atol=1e-5)


def test_a_chain_whose_hidden_tensor_the_forward_also_reads_is_not_rewritten():
    """Rewriting it would hand the MoE output to the code that reads the hidden activations: silently wrong."""
    torch.manual_seed(0)
    dense = nn.Sequential(DataDependentBlock(read_hidden=True), DataDependentBlock()).eval()
    moe = moe_compile.convert(dense, MoEConfig(num_experts=4, top_k=2), example_inputs=features())
    assert [s.name for s in moe.moe_report.converted] == ["1:up..down"]
    torch.testing.assert_close(moe(features(seed=1)), dense(features(seed=1)), rtol=0, atol=1e-5)
