"""The custom op moe_compile::moe_ffn (CPU implementation): equal to the eager MoELayer and to a token loop,
gradients equal to the eager layer's, opcheck, one node under torch.export, clear errors on bad operands."""

from __future__ import annotations

import pytest
import torch

from moe_compile.config import MoEConfig
from moe_compile.kernels import layer_operands, moe_ffn

from ..moe.test_layer import D, expert_ffn, random_layer

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
VARIANTS = [(act, gated, bias) for act in ACTIVATIONS for gated in (False, True) for bias in (True, False)]


def _layer(activation="gelu", gated=False, bias=True, num_experts=4, top_k=2, seed=0):
    config = MoEConfig(num_experts=num_experts, routing="token_choice", top_k=top_k, capacity_factor=None)
    return random_layer(config, gated=gated, bias=bias, activation=activation, seed=seed)


def _routing(layer, x):
    """(expert_ids, gates) [T, k] as the layer's router decides them."""
    flat = x.reshape(-1, D)
    probs = torch.softmax(flat @ layer.router.weight.t(), dim=-1)
    gates, expert_ids = layer.router.select(probs)
    return expert_ids, gates


def _op(layer, x, expert_ids, gates):
    return moe_ffn(x.reshape(-1, D), expert_ids, gates, **layer_operands(layer), activation=layer.activation,
                   gated=layer.gated)


@pytest.mark.parametrize("activation,gated,bias", VARIANTS)
def test_op_equals_eager_layer(activation, gated, bias):
    layer = _layer(activation, gated, bias)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x).reshape(-1, D)
        got = _op(layer, x, *_routing(layer, x))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("expert_ids", [
    torch.zeros(9, 1, dtype=torch.long),  # every token to expert 0
    torch.tensor([[0, 2], [2, 0], [2, 0]] * 3, dtype=torch.int32),  # experts 1 and 3 empty
    torch.tensor([[3, 1]] * 9),
], ids=["all-to-one", "empty-experts", "same-pair"])
def test_skewed_routings_equal_token_loop(expert_ids):
    layer = _layer("silu", gated=True)
    x = torch.randn(expert_ids.shape[0], D, generator=torch.Generator().manual_seed(2))
    gates = torch.rand(expert_ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = _op(layer, x, expert_ids, gates)
        want = torch.stack([sum(gates[t, i] * expert_ffn(layer, int(expert_ids[t, i]), x[t:t + 1])[0]
                                for i in range(expert_ids.shape[1])) for t in range(x.shape[0])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_gradients_equal_eager_layer(gated, bias):
    eager = _layer("gelu_tanh", gated, bias)
    via_op = _layer("gelu_tanh", gated, bias)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(4))
    x_eager, x_op = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(12, D, generator=torch.Generator().manual_seed(5))

    ((eager(x_eager).reshape(-1, D) - target) ** 2).sum().backward()
    flat = x_op.reshape(-1, D)
    probs = torch.softmax(flat @ via_op.router.weight.t(), dim=-1)  # gates carry the router's gradient
    gates, expert_ids = via_op.router.select(probs)
    ((_op(via_op, x_op, expert_ids, gates) - target) ** 2).sum().backward()

    torch.testing.assert_close(x_op.grad, x_eager.grad, rtol=0, atol=1e-5)
    for (name, p_eager), p_op in zip(eager.named_parameters(), via_op.parameters()):
        torch.testing.assert_close(p_op.grad, p_eager.grad, rtol=0, atol=1e-5, msg=name)


def _operands(gated, dtype=torch.float32, tokens=5, k=2, num_experts=3, d=4, width=6):
    g = torch.Generator().manual_seed(6)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    rows = 2 * width if gated else width
    expert_ids = torch.randint(0, num_experts, (tokens, k), generator=g, dtype=torch.int32)
    return [r(tokens, d), expert_ids, torch.rand(tokens, k, generator=g, dtype=dtype), r(num_experts, rows, d),
            r(num_experts, rows), r(num_experts, d, width), r(num_experts, d)]


def test_opcheck():  # schema, fake tensor, autograd registration, AOT dispatch with dynamic shapes
    gated = True
    args = _operands(gated)
    for i in (0, 2, 3, 4, 5, 6):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.moe_compile.moe_ffn.default, (*args, "silu", gated))


def test_export_keeps_one_node():
    layer = _layer("relu")

    class Block(torch.nn.Module):
        def forward(self, x, expert_ids, gates):
            return _op(layer, x, expert_ids, gates)

    x = torch.randn(6, D)
    expert_ids, gates = _routing(layer, x)
    tokens = torch.export.Dim("tokens")
    program = torch.export.export(Block(), (x, expert_ids, gates),
                                  dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moe_compile.moe_ffn.default) == 1
    x2 = torch.randn(11, D)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2, *_routing(layer, x2)), Block()(x2, *_routing(layer, x2)))


def test_bad_operands_name_the_problem():
    x, ids, gates, w1, b1, w2, b2 = _operands(gated=False)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        moe_ffn(x, ids, gates, w1, b1, w2, b2, "swish", False)
    with pytest.raises(ValueError, match="not transposed"):
        moe_ffn(x, ids, gates, w1.transpose(1, 2), b1, w2, b2, "relu", False)
    with pytest.raises(ValueError, match="gated"):
        moe_ffn(x, ids, gates, w1, b1, w2, b2, "relu", True)
    with pytest.raises(ValueError, match="int32 or int64"):
        moe_ffn(x, ids.float(), gates, w1, b1, w2, b2, "relu", False)
