"""Encoders and encoder-decoders convert with no example inputs (a transformers model brings its own): BERT-style
FFNs in sibling modules (intermediate: dense + act; output: dense, dropout, LayerNorm of the residual sum), T5's
FFN module with a dropout on its hidden activations, BART's and OPT's FFN inline in a layer torch.fx cannot trace."""

from __future__ import annotations

import pytest
import torch

import moe_compile
from moe_compile import MoEConfig, MoELayer

from ..conftest import VOCAB

transformers = pytest.importorskip("transformers")

# family -> (model class, config class, config fields, how each FFN is rewritten)
ENCODERS = {
    "bert": ("BertForMaskedLM", "BertConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4), "located with torch.export"),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(hidden_size=64, intermediate_size=128,
                                                             num_hidden_layers=2, num_attention_heads=4),
                "located with torch.export"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertConfig", dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4),
                   "replaced module FFN"),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
           "fx graph"),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4), "located with torch.export"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=64),
            "located with torch.export"),
}
SITES = {"t5": 4, "bart": 4}  # encoder and decoder FFNs


def build(family):
    model_class, config_class, fields, _ = ENCODERS[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, vocab_size=VOCAB))
    with torch.no_grad():  # non-zero biases, so that a bias added twice or dropped shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def inputs(family, batch=3, seq=11, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -3:] = 0  # padding
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if family in ("t5", "bart"):
        kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 4), generator=generator)
    return kwargs


@pytest.fixture(scope="module")
def dense():
    return {family: build(family) for family in ENCODERS}


@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, top_k=2), MoEConfig(num_experts=4, top_k=4,
                                                                                 experts="split")],
                         ids=["upcycle top-2", "split k=E"])
@pytest.mark.parametrize("family", ENCODERS)
def test_converts_exactly_without_example_inputs(dense, family, config):
    moe = moe_compile.convert(dense[family], config)
    sites = moe.moe_report.converted
    assert len(sites) == SITES.get(family, 2), moe.moe_report.table()
    assert all(ENCODERS[family][3] in site.reason for site in sites), moe.moe_report.table()
    assert sum(isinstance(m, MoELayer) for m in moe.modules()) == len(sites)
    with torch.no_grad():
        got, want = moe(**inputs(family)), dense[family](**inputs(family))
    for field in ("logits", "encoder_last_hidden_state"):
        if field in want:
            assert (got[field] - want[field]).abs().max().item() <= 1e-5, field


def test_bert_keeps_its_residual_and_layer_norm(dense):
    moe = moe_compile.convert(dense["bert"], MoEConfig(num_experts=4))
    layer = moe.bert.encoder.layer[0]
    assert type(layer).__name__ == "BertLayer"  # the classes and their forwards are untouched
    assert isinstance(layer.intermediate.dense, MoELayer)
    assert isinstance(layer.output.dense, torch.nn.Identity) and isinstance(layer.output.LayerNorm, torch.nn.LayerNorm)


@pytest.mark.parametrize("family", ["bert", "bart"])  # RoBERTa, DistilBERT, OPT: same paths; T5: see the README
def test_encoders_export_and_match(dense, family, tmp_path):
    moe = moe_compile.convert(dense[family], MoEConfig(num_experts=4, top_k=2, upcycle_noise=0.3))
    moe_compile.export(moe, inputs(family, 1, 5), tmp_path / "m.onnx", target="ort")
    parity = moe_compile.check_parity(moe, tmp_path / "m.onnx", inputs(family, 3, 13, seed=2))
    assert parity.passed, parity.table()
    assert parity.outputs[0].name == "logits"
