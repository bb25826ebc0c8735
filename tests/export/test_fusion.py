"""fuse_attention on `ort` exports of tiny causal LMs: attention becomes com.microsoft.GroupQueryAttention (causal
masks) or MultiHeadAttention, the MoE layers stay as they were, and ONNX Runtime still computes the eager logits at a
shape other than the export's."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import moe_compile
from moe_compile.export import exporter
from moe_compile.export.fusion import FUSED_DOMAIN, FUSED_OP, GQA_OP, fuse_attention

from ..conftest import VOCAB, make_hf_gpt2, make_hf_llama

ort = pytest.importorskip("onnxruntime")

LAYERS = 2  # make_hf_gpt2 / make_hf_llama
CHECK = (3, 37)  # batch, sequence: not the export's (2, 8)


def _moe(dense: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moe_compile.convert(dense, moe_compile.MoEConfig(num_experts=4, top_k=2, experts="split",
                                                                 combine="weighted"))


def _mask(batch: int, seq: int) -> torch.Tensor:
    """All ones but left padding: row 1 starts at token 5, row 2 at token 11."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return mask


def _session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _moe_nodes(graph: onnx.GraphProto) -> list[str]:
    return [str(node) for node in graph.node if node.op_type == "MoE"]


# (family, MoE-converted, exported with an attention_mask input): both families, dense and MoE, both input sets
CASES = [("gpt2", False, False), ("gpt2", True, True), ("llama", False, True), ("llama", True, False)]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    cache = {}

    def get(family: str, moe: bool, with_mask: bool):
        key = (family, moe, with_mask)
        if key not in cache:
            model = {"gpt2": make_hf_gpt2, "llama": make_hf_llama}[family]()
            model = _moe(model) if moe else model
            ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
            example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if with_mask else (ids,)
            path = tmp_path_factory.mktemp("fusion") / f"{family}.onnx"
            with pytest.MonkeyPatch.context() as patch:  # the unfused ort export, to fuse and compare here
                patch.setattr(exporter, "fuse_attention", lambda model, causal=None: (model, 0))
                moe_compile.export(model, example, path, target="ort")
            exported = onnx.load(str(path))
            cache[key] = (model, exported, *fuse_attention(exported))
        return cache[key]

    return get


def _check(model, exported, fused_model, with_mask):
    """The fused graph equals eager at CHECK (with left padding if the export takes an attention_mask) wherever
    the mask lets a token attend, and the unfused export everywhere but at padding queries (whose rows are all
    masked: meaningless, and attended differently by GroupQueryAttention, see fusion.py)."""
    ids = torch.randint(0, VOCAB, CHECK, generator=torch.Generator().manual_seed(1))
    feed = {"input_ids": ids.numpy()}
    mask = _mask(*CHECK) if with_mask else torch.ones(CHECK, dtype=torch.long)
    if with_mask:
        feed["attention_mask"] = mask.numpy()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask if with_mask else None).logits.numpy()
    got = _session(fused_model).run(["logits"], feed)[0]
    unfused = _session(exported).run(["logits"], feed)[0]
    valid = mask.numpy().astype(bool)
    assert np.abs(got - expected)[valid].max() <= 1e-4
    assert np.abs(got - unfused)[valid].max() <= 1e-5


@pytest.mark.parametrize("family, moe, with_mask", CASES, ids=lambda v: str(v))
def test_fused_graph_matches_eager(fused, family, moe, with_mask):
    model, exported, fused_model, count = fused(family, moe, with_mask)
    ops = [(node.domain, node.op_type) for node in fused_model.graph.node]
    assert count == LAYERS
    assert ops.count((FUSED_DOMAIN, GQA_OP)) == LAYERS  # the masks are causal: the causal kernel
    onnx.checker.check_model(fused_model)
    if moe:  # the MoE layers untouched: the same com.microsoft.MoE nodes, and the router's Softmax is theirs
        assert _moe_nodes(fused_model.graph) == _moe_nodes(exported.graph) and len(_moe_nodes(exported.graph)) == 2
    softmax_left = sum(op == ("", "Softmax") for op in ops)
    assert softmax_left == (LAYERS if moe else 0)  # one router Softmax per MoE layer, none in attention

    _check(model, exported, fused_model, with_mask)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_multi_head_attention_when_not_causal(fused, family):
    """causal=False: MultiHeadAttention with the mask as attention_bias, no GroupQueryAttention."""
    model, exported, _, _ = fused(family, True, family == "gpt2")  # two of CASES
    fused_model, count = fuse_attention(exported, causal=False)
    ops = [(node.domain, node.op_type) for node in fused_model.graph.node]
    assert count == LAYERS and ops.count((FUSED_DOMAIN, FUSED_OP)) == LAYERS and (FUSED_DOMAIN, GQA_OP) not in ops
    _check(model, exported, fused_model, family == "gpt2")


class Bidirectional(torch.nn.Module):
    """One attention layer over all tokens but padding (an encoder's): its mask is not causal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x, attention_mask):
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        keep = attention_mask[:, None, None, :].bool()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)


def test_bidirectional_mask_not_causal(tmp_path):
    """The probe finds a padding-only mask not causal: MultiHeadAttention, and the numbers of eager."""
    model = Bidirectional().eval()
    x = torch.randn(2, 8, 16)
    path = tmp_path / "bidirectional.onnx"
    report = moe_compile.export(model, {"x": x, "attention_mask": torch.ones(2, 8, dtype=torch.long)}, path,
                                target="ort")  # the ort target fuses as it exports
    fused_model = onnx.load(str(path))
    ops = [(node.domain, node.op_type) for node in fused_model.graph.node]
    assert report.attention_fused == 1 and ops.count((FUSED_DOMAIN, FUSED_OP)) == 1
    assert (FUSED_DOMAIN, GQA_OP) not in ops
    x, mask = torch.randn(3, 37, 16), _mask(3, 37)
    with torch.no_grad():
        expected = model(x, mask).numpy()
    (got,) = _session(fused_model).run(None, {"x": x.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(got - expected).max() <= 1e-5


def test_no_attention_left_alone():
    """A graph with no attention subgraph comes back as it was, count 0."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph)
    out, count = fuse_attention(model)
    assert count == 0 and out is model


@pytest.mark.parametrize("lookahead, causal", [(0, True), (1, False)])
def test_a_decoder_mask_is_probed_causal_over_past_and_new_keys(lookahead, causal):
    """Key j of new query i (keys: the past p, then the s new) is masked when j > p + i + lookahead: causal only
    without lookahead, at every probe shape, the past of size 0 included."""
    from onnx import TensorProto, helper

    from moe_compile.export.fusion import _causal_masks

    int64 = lambda name, value: helper.make_tensor(name, TensorProto.INT64, [], [value])  # noqa: E731
    nodes = [helper.make_node("Shape", ["input_ids"], ["s"], start=1, end=2),
             helper.make_node("Shape", ["past"], ["p"], start=2, end=3),
             helper.make_node("Add", ["p", "s"], ["t"]),
             helper.make_node("Squeeze", ["t"], ["t0"]), helper.make_node("Squeeze", ["p"], ["p0"]),
             helper.make_node("Range", ["zero", "t0", "one"], ["keys"]),
             helper.make_node("Range", ["p0", "t0", "one"], ["queries"]),
             helper.make_node("Add", ["queries", "lookahead"], ["last"]),
             helper.make_node("Unsqueeze", ["last", "axis"], ["column"]),
             helper.make_node("Greater", ["keys", "column"], ["after"]),
             helper.make_node("Where", ["after", "min", "zero_f"], ["mask2d"]),
             helper.make_node("Unsqueeze", ["mask2d", "axes01"], ["mask"])]
    graph = helper.make_graph(
        nodes, "decoder_mask",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_sequence", 4])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)],
        [int64("zero", 0), int64("one", 1), int64("lookahead", lookahead),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
         helper.make_tensor("axes01", TensorProto.INT64, [2], [0, 1]),
         helper.make_tensor("min", TensorProto.FLOAT, [], [np.finfo(np.float32).min]),
         helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert _causal_masks(model, ["mask"]) == ({"mask"} if causal else set())
