"""FFN detection: each pattern variant (activation as module or function, biases, dropout, gated, Sequential,
Conv1D), the report's content, and the cases that must be skipped or reported, leaving the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_compile import MoECompileError, MoEConfig, NoFFNFoundError, convert, find_ffn_blocks
from moe_compile.moe import MoELayer

D, H = 16, 32

ACTS = {
    # name: (callable used in forward or module class, canonical activation, is a module)
    "relu_module": (nn.ReLU, "relu", True),
    "relu_function": (F.relu, "relu", False),
    "relu_torch": (torch.relu, "relu", False),
    "relu_method": (lambda h: h.relu(), "relu", False),
    "silu_module": (nn.SiLU, "silu", True),
    "silu_function": (F.silu, "silu", False),
    "gelu_module": (nn.GELU, "gelu", True),
    "gelu_function": (F.gelu, "gelu", False),
    "gelu_tanh_module": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh", True),
    "gelu_tanh_function": (lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh", False),
    # several ops written inline on the up projection's output
    "relu2_inline": (lambda h: F.relu(h).square(), "relu2", False),
    "gelu_tanh_written_out": (lambda h: 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h ** 3))),
                              "gelu_tanh", False),
}


class MLP(nn.Module):
    def __init__(self, act: str, bias: bool = True, dropout: str = "none"):
        super().__init__()
        fn, _, is_module = ACTS[act]
        self.up = nn.Linear(D, H, bias=bias)
        self.down = nn.Linear(H, D, bias=bias)
        self.act = fn() if is_module else fn
        self.drop = nn.Dropout(0.1) if dropout == "module" else None
        self.dropout = dropout

    def forward(self, x):
        y = self.down(self.act(self.up(x)))
        if self.dropout == "module":
            y = self.drop(y)
        elif self.dropout == "function":
            y = F.dropout(y, p=0.1, training=self.training)
        return y


class Gated(nn.Module):
    def __init__(self, act: str = "silu_module", bias: bool = False, up_first: bool = False):
        super().__init__()
        fn, _, is_module = ACTS[act]
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)
        self.act = fn() if is_module else fn
        self.up_first = up_first

    def forward(self, x):
        gate, up = self.act(self.gate_proj(x)), self.up_proj(x)
        return self.down_proj(up * gate if self.up_first else gate * up)


class Host(nn.Module):
    """Embedding -> LayerNorm -> ffn, plus a residual; the FFN lives in the `ffn` child."""

    def __init__(self, ffn: nn.Module, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(32, D)
        self.norm = nn.LayerNorm(D)
        self.ffn = ffn
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p) * 0.3)

    def forward(self, ids):
        x = self.emb(ids)
        return x + self.ffn(self.norm(x))


IDS = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_exact_conversion(model):
    """Upcycle with renormalised top-2 reproduces the dense model; the FFN site became an MoELayer."""
    model = model.eval()
    converted = convert(model, MoEConfig(num_experts=4, top_k=2))
    assert isinstance(converted.ffn, MoELayer)
    with torch.no_grad():
        assert (converted(IDS) - model(IDS)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", ["none", "module", "function"])
def test_plain_ffn_variants(act, bias, dropout):
    model = Host(MLP(act, bias, dropout))
    report = find_ffn_blocks(model)
    assert len(report.sites) == 1
    site = report.sites[0]
    expected = f"Linear -> {ACTS[act][1]} -> Linear" + (" -> Dropout" if dropout != "none" else "")
    assert (site.name, site.module, site.pattern) == ("ffn", "ffn", expected)
    assert (site.d_model, site.d_ff, site.bias, site.gated, site.action) == (D, H, bias, False, "found")
    _assert_exact_conversion(model)


@pytest.mark.parametrize("act, name", [("silu_module", "silu"), ("silu_function", "silu"),
                                       ("gelu_tanh_function", "gelu_tanh")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("up_first", [True, False])
def test_gated_ffn_variants(act, name, bias, up_first):
    model = Host(Gated(act, bias, up_first))
    (site,) = find_ffn_blocks(model).sites
    assert site.pattern == f"Linear(gate) -> {name} * Linear(up) -> Linear(down)"
    assert (site.name, site.d_model, site.d_ff, site.bias, site.gated, site.action) == ("ffn", D, H, bias, True,
                                                                                        "found")
    _assert_exact_conversion(model)


def test_sequential_mlp():
    model = Host(nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D), nn.Dropout(0.1)))
    (site,) = find_ffn_blocks(model).sites
    assert (site.name, site.pattern, site.action) == ("ffn", "Linear -> relu -> Linear -> Dropout", "found")
    _assert_exact_conversion(model)


def test_transformers_new_gelu_module_is_gelu_tanh():
    activations = pytest.importorskip("transformers.activations")

    class NewGeluMLP(MLP):
        def __init__(self):
            super().__init__("relu_module")
            self.act = activations.NewGELUActivation()

    (site,) = find_ffn_blocks(Host(NewGeluMLP())).sites
    assert site.pattern == "Linear -> gelu_tanh -> Linear"


@pytest.mark.parametrize("fixture, sites, pattern, d_ff, bias", [
    ("nanogpt", ["transformer.h.0.mlp", "transformer.h.1.mlp"], "Linear -> gelu -> Linear -> Dropout", 256, True),
    ("nanogpt_inline", ["transformer.h.0:fc_in..fc_out", "transformer.h.1:fc_in..fc_out"],
     "Linear -> gelu -> Linear -> Dropout", 256, True),
    ("hf_gpt2", ["transformer.h.0.mlp", "transformer.h.1.mlp"], "Conv1D -> gelu_tanh -> Conv1D -> Dropout", 256,
     True),
    ("hf_llama", ["model.layers.0.mlp", "model.layers.1.mlp"],
     "Linear(gate) -> silu * Linear(up) -> Linear(down)", 128, False),
])
def test_finds_sites_in_models(request, fixture, sites, pattern, d_ff, bias):
    model = request.getfixturevalue(fixture)
    before = _state(model)
    report = find_ffn_blocks(model)
    assert [s.name for s in report.sites] == sites
    for s in report.sites:
        assert (s.pattern, s.d_model, s.d_ff, s.bias, s.action, s.reason) == (pattern, 64, d_ff, bias, "found", "")
        assert s.gated == ("gate" in pattern)
    assert report.config is None
    assert _same_state(before, model.state_dict())  # detection changes nothing
    table = report.table()
    for s in sites:
        assert s in table
    assert pattern in table


def test_attention_of_hf_models_is_reported_untraceable(hf_gpt2):
    notes = {n.module: n.outcome for n in find_ffn_blocks(hf_gpt2).notes}
    assert notes["transformer.h.0.attn"].startswith("not traceable with torch.fx")


# ---------------------------------------------------------------- nothing to convert / skipped sites

class NoFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x):
        return self.b(x) + self.a(x).tanh()


def test_no_ffn_leaves_model_unchanged_and_convert_says_what_it_searched():
    model = NoFFN()
    before, modules = _state(model), list(model.modules())
    report = find_ffn_blocks(model)
    assert report.sites == [] and [(n.module, n.outcome) for n in report.notes] == [("", "traced; no FFN pattern")]
    with pytest.raises(NoFFNFoundError) as info:
        convert(model, MoEConfig(num_experts=4), inplace=True)
    message = str(info.value)
    assert "found no dense FFN to convert in NoFFN" in message
    assert "Linear/Conv1D -> activation -> Linear/Conv1D" in message
    assert "down(act(gate(x)) * up(x))" in message
    assert "traced; no FFN pattern" in message
    assert list(model.modules()) == modules and _same_state(before, model.state_dict())
    assert not hasattr(model, "moe_report")


def test_no_projection_at_all():
    with pytest.raises(NoFFNFoundError, match="searched for|Searched for"):
        convert(nn.Sequential(nn.Linear(D, D), nn.Tanh()), MoEConfig(num_experts=4))
    assert find_ffn_blocks(nn.Sequential(nn.Linear(D, D))).sites == []


class Untraceable(nn.Module):
    """An FFN whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        if h.sum() > 0:
            h = h * 2
        return self.down(h)


def test_ffn_in_untraceable_module_is_reported():
    model = Host(Untraceable())
    report = find_ffn_blocks(model)
    assert report.sites == []
    note, unsearched = report.notes
    assert "pass example_inputs" in unsearched.outcome
    assert note.module == "ffn"
    assert note.outcome.startswith("not traceable with torch.fx") and "control flow" in note.outcome
    with pytest.raises(NoFFNFoundError) as info:
        convert(model, MoEConfig(num_experts=4))
    assert "ffn" in str(info.value) and "not traceable" in str(info.value)


class UntraceableBlock(nn.Module):
    """Does not trace, but holds an MLP child (found) and two projections of its own (reported)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.mlp = MLP("gelu_module")

    def forward(self, x):
        if x.mean() > 100:
            x = x * 0
        return x + self.q(x) * self.k(x) + self.mlp(x)


def test_descends_into_children_of_untraceable_module():
    model = UntraceableBlock().eval()
    report = find_ffn_blocks(model)
    assert [s.name for s in report.sites] == ["mlp"]
    assert [n.module for n in report.notes] == [""] and "not traceable" in report.notes[0].outcome
    converted = convert(model, MoEConfig(num_experts=4))
    assert isinstance(converted.mlp, MoELayer) and type(converted) is UntraceableBlock
    x = torch.randn(3, D)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


class Escaping(nn.Module):
    """Two FFNs; the first one's hidden activation is used again after the FFN."""

    def __init__(self):
        super().__init__()
        self.up1, self.down1 = nn.Linear(D, H), nn.Linear(H, D)
        self.up2, self.down2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = F.relu(self.up1(x))
        y = self.down1(h) + h.mean(-1, keepdim=True)
        return y + self.down2(F.silu(self.up2(y)))


def test_intermediate_used_elsewhere_is_skipped_with_reason():
    model = Escaping().eval()
    report = find_ffn_blocks(model)
    by_name = {s.name: s for s in report.sites}
    assert set(by_name) == {"up1..down1", "up2..down2"}
    assert by_name["up1..down1"].action == "skipped"
    assert by_name["up1..down1"].reason == "intermediate values ['relu'] are also used outside the FFN"
    assert by_name["up2..down2"].action == "found"

    converted = convert(model, MoEConfig(num_experts=4))
    by_name = {s.name: s for s in converted.moe_report.sites}
    assert by_name["up1..down1"].action == "skipped"
    assert by_name["up2..down2"].action == "converted"
    assert hasattr(converted, "up1") and hasattr(converted, "down1")  # the skipped site is kept as it was
    assert not hasattr(converted, "up2") and isinstance(converted.moe, MoELayer)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5

    only_skipped = nn.Sequential()
    only_skipped.add_module("f", _OnlyEscaping())
    with pytest.raises(NoFFNFoundError, match="also used outside the FFN"):
        convert(only_skipped, MoEConfig(num_experts=4))


class _OnlyEscaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = F.relu(self.up(x))
        return self.down(h) + h.sum(-1, keepdim=True)


class ShapeMismatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, 8)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def test_shape_mismatch_is_skipped_with_reason():
    (site,) = find_ffn_blocks(ShapeMismatch()).sites
    assert site.action == "skipped"
    assert site.reason == f"shapes do not form an FFN: up is {D}->{H}, down is {H}->8"


class UnknownActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_unknown_activation_is_not_an_ffn():
    report = find_ffn_blocks(UnknownActivation())
    assert report.sites == [] and report.notes[0].outcome == "traced; no FFN pattern"


# ---------------------------------------------------------------- several sites, shared modules, a root FFN

class TwoInline(nn.Module):
    def __init__(self):
        super().__init__()
        self.a1, self.b1 = nn.Linear(D, H), nn.Linear(H, D)
        self.a2, self.b2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        x = x + self.b1(F.relu(self.a1(x)))
        return x + self.b2(F.gelu(self.a2(x)))


def test_two_inline_ffns_in_one_graph():
    model = TwoInline().eval()
    converted = convert(model, MoEConfig(num_experts=4))
    assert [(s.name, s.action) for s in converted.moe_report.sites] == [("a1..b1", "converted"),
                                                                         ("a2..b2", "converted")]
    assert isinstance(converted.moe, MoELayer) and isinstance(converted.moe_1, MoELayer)
    assert (converted.moe.activation, converted.moe_1.activation) == ("relu", "gelu")
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


class SharedMLP(nn.Module):
    """One MLP object used by every layer (ALBERT-style sharing)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
        self.layers = nn.ModuleList([self.mlp, self.mlp, self.mlp])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_shared_mlp_is_converted_once_and_stays_shared():
    model = SharedMLP().eval()
    converted = convert(model, MoEConfig(num_experts=4, top_k=1, experts="split"))
    assert [s.name for s in converted.moe_report.sites] == ["mlp"]
    assert isinstance(converted.mlp, MoELayer)
    assert all(layer is converted.mlp for layer in converted.layers)
    assert sum(1 for _ in converted.modules() if isinstance(_, MoELayer)) == 1
    assert all(layer is model.mlp for layer in model.layers) and isinstance(model.mlp, nn.Sequential)


def test_model_that_is_an_ffn():
    model = nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Linear(H, D)).eval()
    converted = convert(model, MoEConfig(num_experts=4))
    assert isinstance(converted, MoELayer) and converted.moe_report.sites[0].name == ""
    x = torch.randn(3, D)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


class ViewedHalves(nn.Module):
    """Moshi's gated FFN: one projection viewed as [batch, seq, 2, f], gate and up indexed [..., i, :]; with
    `leak`, the batch size read off the projection is also used after the FFN."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.leak = nn.Linear(D, 2 * H, bias=False), nn.Linear(H, D, bias=False), leak

    def forward(self, x):
        h = self.fc1(x)
        batch, seq, _ = h.shape
        h = h.view(batch, seq, 2, -1)
        y = self.fc2(F.gelu(h[..., 0, :]) * h[..., 1, :])
        return y * batch if self.leak else y


def test_halves_of_a_viewed_projection_are_gate_and_up():
    model = ViewedHalves().eval()
    converted = convert(model, MoEConfig(experts="split", num_experts=4, top_k=4))
    (site,) = converted.moe_report.converted
    assert site.gated and site.d_ff == H
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5
    leaking = find_ffn_blocks(ViewedHalves(leak=True).eval())
    assert leaking.sites == []  # its size is read outside the FFN: the projection cannot be replaced


# ---------------------------------------------------------------- constant scales, learned activations, hidden norms

class Scaled(nn.Module):
    """Falcon-H1's multipliers (numbers on the gate and the down projection) and Dory's per-channel scales (a
    parameter times a number) on the up projection."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)
        self.up_scale = nn.Parameter(torch.rand(H) + 0.5)

    def forward(self, x):
        h = F.silu(self.gate(x) * 0.7) * (self.up(x) * (self.up_scale * H ** 0.5))
        return self.down(h) * 1.3


class InputScaled(Scaled):
    def forward(self, x):
        return self.down(F.silu(self.gate(x) * x.mean()) * self.up(x))  # a scale that depends on x is no constant


class LearnedSwish(nn.Module):
    """y = a x sigmoid(b x) with learned scalars a, b (an elementwise activation of its own, like xIELU)."""

    def __init__(self, per_channel: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.2]))
        self.b = nn.Parameter(torch.full((H,) if per_channel else (1,), 0.8))

    def forward(self, x):
        return self.a * x * torch.sigmoid(self.b * x)


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, h):
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class HiddenNorm(nn.Module):
    """BitNet's FFN: down(norm(act(gate(x)) * up(x))), norm the model's own module."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)
        self.norm = norm

    def forward(self, x):
        return self.down(self.norm(F.silu(self.gate(x)) * self.up(x)))


def _exact_both_ways(model, split: bool = True):
    """Upcycle top-2 of 4 and (split=True) split k = E = 4 reproduce the dense model; returns the upcycled one."""
    model = model.eval()
    configs = [MoEConfig(num_experts=4, top_k=2)] + [MoEConfig(num_experts=4, top_k=4, experts="split")] * split
    for config in configs:
        converted = convert(model, config)
        assert isinstance(converted.ffn, MoELayer), converted.moe_report.table()
        with torch.no_grad():
            assert (converted(IDS) - model(IDS)).abs().max().item() <= 1e-5
    return convert(model, configs[0])


def test_constant_scales_fold_into_the_projections():
    model = Host(Scaled())
    (site,) = find_ffn_blocks(model).sites
    assert site.pattern == "Linear(gate) -> silu * Linear(up) -> Linear(down) (constant scales folded)"
    moe = _exact_both_ways(model)
    assert not any("scale" in name for name, _ in moe.named_parameters())  # folded: the experts hold plain weights


def test_a_scale_that_depends_on_the_input_is_not_folded():
    assert find_ffn_blocks(Host(InputScaled())).sites == []


def test_a_learned_elementwise_activation_is_kept_as_the_module():
    model = Host(nn.Sequential(nn.Linear(D, H), LearnedSwish(), nn.Linear(H, D)))
    (site,) = find_ffn_blocks(model).sites
    assert site.pattern == "Linear -> LearnedSwish (learned) -> Linear"
    moe = _exact_both_ways(model)
    assert isinstance(moe.ffn.activation, LearnedSwish) and "ffn.activation.a" in moe.state_dict()


def test_a_learned_activation_with_a_parameter_per_channel_is_not_elementwise():
    model = Host(nn.Sequential(nn.Linear(D, H), LearnedSwish(per_channel=True), nn.Linear(H, D)))
    assert find_ffn_blocks(model).sites == []


def test_a_hidden_norm_is_upcycled_and_split_is_refused():
    model = Host(HiddenNorm(RMSNorm(H)))
    (site,) = find_ffn_blocks(model).sites
    assert site.pattern == "Linear(gate) -> silu * Linear(up) -> RMSNorm -> Linear(down)"
    moe = _exact_both_ways(model, split=False)
    assert isinstance(moe.ffn.hidden_norm, RMSNorm)
    with pytest.raises(MoECompileError, match="cannot split ffn into experts: its hidden norm RMSNorm"):
        convert(model, MoEConfig(num_experts=4, top_k=4, experts="split"))


def test_an_elementwise_hidden_module_splits_exactly():
    _exact_both_ways(Host(HiddenNorm(nn.Tanh())))


def test_a_hidden_module_that_changes_the_width_is_skipped():
    class Halve(nn.Module):
        def forward(self, h):
            return torch.cat([h[..., ::2], h[..., 1::2]], -1)[..., : H // 2]

    (site,) = find_ffn_blocks(HiddenNorm(Halve())).sites
    assert site.action == "skipped" and "does not map the 32 hidden values" in site.reason


class OptionalArgument(nn.Module):
    """Takes an argument that defaults to None and branches on it (Moshi's MLP: `fc1(x) if layer_idx is None else
    fc1(x, layer_idx)`): the plain trace takes the other branch and finds no FFN, so it is traced again with the
    argument as None, and the graph asserts that it stays None."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x, shift=None):
        h = self.up(x) if shift is None else self.up(x) * shift
        return self.down(F.gelu(h))


def test_an_argument_that_defaults_to_none_is_traced_as_none():
    model = Host(OptionalArgument())
    (site,) = find_ffn_blocks(model).sites
    assert site.pattern == "Linear -> gelu -> Linear" and site.action == "found"
    moe = convert(model, MoEConfig(num_experts=4, top_k=4, experts="split"))
    with torch.no_grad():
        assert (moe(IDS) - model(IDS)).abs().max().item() <= 1e-5
    for call in ((torch.ones(D),), {"shift": torch.ones(D)}):  # positional or by keyword: refused, not ignored
        args, kwargs = (call, {}) if isinstance(call, tuple) else ((), call)
        with pytest.raises(AssertionError, match="shift has been specialized to have value None"):
            moe.ffn(torch.randn(2, 3, D), *args, **kwargs)
