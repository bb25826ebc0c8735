"""FFN patterns over a torch.fx graph, as node predicates.

    plain   x -> up -> act [-> dropout] [-> norm] -> down [-> dropout]            ->  MoE(x)
    gated   x -> gate -> act --\
            x -> up -----------* [-> dropout] [-> norm] -> down [-> dropout]      ->  MoE(x)
            (gate and up may be the two halves of one fused projection, chunked along the last axis: Phi-3, GLM;
            or viewed as [..., 2, f] and indexed [..., i, :]: Moshi)

where up, gate and down are projections (nn.Linear, Conv1D, ...), act is any node that computes a known activation
(a module such as nn.GELU or NewGELUActivation, F.gelu(..., approximate=...), F.silu, x.relu(), ...) or an
elementwise module with learned scalar parameters (Apertus' xIELU, kept as the module), norm is a module that maps
the hidden vector to one of its shape (BitNet's RMSNorm, nGPT's L2 norm, kept as the module: split experts refuse
one that is not elementwise, moe/experts.py), and dropout an nn.Dropout module, F.dropout or aten.dropout. A dropout
on the hidden activations (T5, BART) acts only in training and MoE experts have none: the report says whether the
rewrite drops it or leaves it acting on the FFN output. Matching (`match_ffns`) finds the anchor shape; checking
(`check_match`) says why a match cannot be rewritten; neither changes the graph.

Any projection's output may be multiplied by a constant s, a number or a tensor of shape [] or [out] computed
from the module's own tensors and numbers alone (Falcon-H1's gate and down multipliers, Dory's per-channel scales):
it is folded into the weights, s (W x + b) = (diag(s) W) x + s b, and the experts never see it.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..moe import DenseFFN, activation_name, identify_activation, is_elementwise
from ..moe.activations import Activation
from .capture import Projection, as_projection

_aten = torch.ops.aten


@dataclass
class FFNMatch:
    input: fx.Node  # x
    up: fx.Node
    down: fx.Node
    act: fx.Node
    output: fx.Node  # the last node replaced: down, or the dropout after it
    gate: Optional[fx.Node] = None
    mul: Optional[fx.Node] = None
    hidden_dropout: Optional[fx.Node] = None  # a dropout between act (or act * up) and down
    norm: Optional[fx.Node] = None  # a module call on the hidden vector, just before down
    norm_module: Optional[nn.Module] = None
    scales: list[fx.Node] = field(default_factory=list)  # the constant multipliers folded into the projections
    act_region: list[fx.Node] = field(default_factory=list)  # an activation module's ATen ops, `act` the last
    halves: list[fx.Node] = field(default_factory=list)  # a fused gate_up projection's chunk and getitem nodes
    dropout: float = 0.0
    activation: Activation = ""
    projections: dict[str, Projection] = field(default_factory=dict)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node the rewrite replaces, in graph order."""
        inner = [self.up, self.gate, *self.halves, *self.scales, *self.act_region, self.act, self.mul,
                 self.hidden_dropout, self.norm, self.down, self.output]
        unique = {id(n): n for n in inner if n is not None}
        order = {n: i for i, n in enumerate(self.down.graph.nodes)}
        return sorted(unique.values(), key=order.__getitem__)

    @property
    def pattern(self) -> str:
        kind = self.projections["up"].kind
        act = activation_name(self.activation)
        hidden = (" -> Dropout" if self.hidden_dropout is not None else "") + \
            (f" -> {type(self.norm_module).__name__}" if self.norm is not None else "")
        gate, up = ("gate", "up") if self.gate is not self.up else ("gate half", "up half")
        core = (f"{kind}({gate}) -> {act} * {kind}({up}){hidden} -> {kind}(down)" if self.gated
                else f"{kind} -> {act}{hidden} -> {kind}")
        dropout = " -> Dropout" if self.output is not self.down and self.output not in self.scales else ""
        return core + dropout + (" (constant scales folded)" if self.scales else "")

    def dense_ffn(self) -> DenseFFN:
        up, down, gate = self.projections["up"], self.projections["down"], self.projections.get("gate")
        return DenseFFN(up_weight=up.weight, up_bias=up.bias, down_weight=down.weight, down_bias=down.bias,
                        activation=self.activation,
                        gate_weight=gate.weight if gate else None, gate_bias=gate.bias if gate else None,
                        dropout=self.dropout, hidden_norm=self.norm_module)


def _module(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _projection(node: fx.Node, root: nn.Module) -> Optional[Projection]:
    """A projection module call (fx), or aten.linear on the root's own weights (an unlifted torch.export graph)."""
    if node.op == "call_function" and node.target is _aten.linear.default:
        params = [p for p in node.args[1:] if p is not None]
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
            return None
        weight, *bias = (_attr(root, p.target) for p in params)
        return Projection(weight, bias[0] if bias else None, module_path(node)[1] or "Linear")
    module = _module(node, root)
    if module is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return as_projection(module)


def module_path(node: fx.Node) -> tuple[str, str]:
    """(qualified name, class name) of the innermost module a torch.export node was recorded in, or ('', '')."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return path, (cls if isinstance(cls, str) else cls.__qualname__).rpartition(".")[2]


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), root)


def _activation_input(node: fx.Node, root: nn.Module) -> Optional[tuple[str, fx.Node, list[fx.Node]]]:
    """(activation, its input node, the ATen nodes before `node` that compute it) when `node` computes a known
    activation of one tensor: on its own (a module call, F.gelu, aten.gelu), as the last of the ATen ops of an
    activation module recorded by torch.export (transformers' NewGELUActivation: pow, mul, add, tanh, ...), or as
    the last of several ops written inline on a projection's output (RWKV's square(relu(h)))."""
    activation = _activation(node, root)
    if activation is not None:
        return activation, node.all_input_nodes[0], []
    region = _module_region(node) or _dataflow_region(node, root)
    if not region:
        return None
    inputs = {a for n in region for a in n.all_input_nodes if a not in region}
    if len(inputs) != 1:
        return None
    (source,) = inputs
    graph = fx.Graph()
    env = {source: graph.placeholder("x")}
    for n in sorted(region, key=list(node.graph.nodes).index):
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[node])
    activation = identify_activation(fx.GraphModule(nn.Module(), graph))
    return (activation, source, [n for n in region if n is not node]) if activation else None


def _module_region(node: fx.Node) -> Optional[set[fx.Node]]:
    """`node` and the nodes feeding it that ran in the same (innermost) module, in a torch.export graph; None
    when that module holds weights (get_attr) or is not recorded."""
    path = module_path(node)[0]
    if not path or node.op != "call_function":
        return None
    region, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in region:
            continue
        if n.op == "get_attr":
            return None
        region.add(n)
        todo += [a for a in n.all_input_nodes if a.op != "placeholder" and module_path(a)[0] == path]
    users_outside = [n for n in region if n is not node and any(u not in region for u in n.users)]
    return None if users_outside or len(region) < 2 else region


def _dataflow_region(node: fx.Node, root: nn.Module, limit: int = 8) -> Optional[set[fx.Node]]:
    """`node` and the ops feeding it back to one projection's output, when they read nothing else (no weights, no
    other input) and nothing else reads them: an activation written inline as several ops (square(relu(h)))."""
    region, sources, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in region or n in sources:
            continue
        if _projection(n, root) is not None:
            sources.add(n)
            continue
        if n.op not in ("call_function", "call_method") or len(region) == limit:
            return None
        region.add(n)
        todo += n.all_input_nodes
    users_outside = [n for n in region if n is not node and any(u not in region for u in n.users)]
    return region if len(sources) == 1 and len(region) >= 2 and not users_outside else None


def _activation(node: fx.Node, root: nn.Module) -> Optional[Activation]:
    """The activation a node computes of its single tensor input, found by evaluating it on a probe: a name, or
    the module itself when it holds learned parameters and is elementwise."""
    tensor_inputs = [a for a in node.all_input_nodes]
    if len(tensor_inputs) != 1 or node.op not in ("call_module", "call_function", "call_method"):
        return None
    if node.op == "call_module":
        module = _module(node, root)
        if len(node.args) != 1:
            return None
        if any(True for _ in module.parameters()):
            return module if is_elementwise(module) else None
        return identify_activation(module)
    if not isinstance(node.args[0], fx.Node) or node.args[0] is not tensor_inputs[0]:
        return None
    rest, kwargs = node.args[1:], node.kwargs
    if node.op == "call_function":
        return identify_activation(lambda x: node.target(x, *rest, **kwargs))
    return identify_activation(lambda x: getattr(x, node.target)(*rest, **kwargs))


def _dropout(node: fx.Node, root: nn.Module) -> Optional[float]:
    module = _module(node, root)
    if isinstance(module, nn.Dropout):
        return module.p
    if node.op == "call_function" and node.target in (nn.functional.dropout, _aten.dropout.default):
        return node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return None


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul, _aten.mul.Tensor)) or \
        (node.op == "call_method" and node.target == "mul")


def match_ffns(gm_root: nn.Module, graph: fx.Graph) -> list[FFNMatch]:
    """Every FFN anchored at a down projection whose input is an activation (plain) or act * up (gated), or a
    norm module of one."""
    matches = []
    for down in graph.nodes:
        down_proj = _projection(down, gm_root)
        if down_proj is None:
            continue
        h = hidden_dropout = down.args[0]
        if not isinstance(h, fx.Node):
            continue
        if _dropout(h, gm_root) is not None and h.args and isinstance(h.args[0], fx.Node):
            h = h.args[0]
        match = _match_plain(h, down, gm_root) or _match_gated(h, down, gm_root)
        norm = _norm_module(h, gm_root) if match is None else None
        if norm is not None:
            match = _match_plain(h.args[0], down, gm_root) or _match_gated(h.args[0], down, gm_root)
            if match is not None:
                match.norm, match.norm_module, h = h, norm, h.args[0]
        if match is None:
            continue
        if hidden_dropout is not h and hidden_dropout is not match.norm:
            match.hidden_dropout = hidden_dropout
        users = list(down.users)
        inner, scale, nodes = _unscaled(users[0], gm_root) if len(users) == 1 else (None, None, [])
        if inner is down and (scaled := _scaled(down_proj, scale)) is not None:
            down_proj, match.output = scaled, users[0]
            match.scales += nodes
        match.projections["down"] = down_proj
        users = list(match.output.users)
        if len(users) == 1 and (p := _dropout(users[0], gm_root)) is not None:
            match.output, match.dropout = users[0], p
        matches.append(match)
    return matches


def _norm_module(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """The module a call node runs on one tensor, when it is neither a projection nor has children (a norm)."""
    module = _module(node, root)
    if module is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node) or \
            next(module.children(), None) is not None or as_projection(module) is not None:
        return None
    return module


def _match_plain(h: fx.Node, down: fx.Node, root: nn.Module) -> Optional[FFNMatch]:
    found = _activation_input(h, root)
    if found is None:
        return None
    activation, up, region = found
    up, scale, scales = _unscaled(up, root)
    up_proj = _scaled(_projection(up, root), scale)
    if up_proj is None:
        return None
    return FFNMatch(input=up.args[0], up=up, down=down, act=h, output=down, activation=activation,
                    projections={"up": up_proj}, act_region=region, scales=scales)


def _match_gated(h: fx.Node, down: fx.Node, root: nn.Module) -> Optional[FFNMatch]:
    if not _is_mul(h) or len(h.args) != 2 or not all(isinstance(a, fx.Node) for a in h.args):
        return None
    for act, up in (h.args, h.args[::-1]):
        found = _activation_input(act, root)
        if found is None:
            continue
        activation, gate, region = found
        (gate, gate_scale, gate_scales), (up, up_scale, up_scales) = _unscaled(gate, root), _unscaled(up, root)
        fused = _fused_halves(gate, up, root)
        if fused is not None:
            projection, gate_proj, up_proj, halves = fused
            gate, up, x = projection, projection, projection.args[0]
        else:
            gate_proj, up_proj, halves = _projection(gate, root), _projection(up, root), []
            if gate_proj is None or up_proj is None or gate.args[0] is not up.args[0]:
                continue
            x = up.args[0]
        gate_proj, up_proj = _scaled(gate_proj, gate_scale), _scaled(up_proj, up_scale)
        if gate_proj is None or up_proj is None:
            continue
        return FFNMatch(input=x, up=up, down=down, act=act, output=down, gate=gate, mul=h, activation=activation,
                        projections={"up": up_proj, "gate": gate_proj}, act_region=region, halves=halves,
                        scales=gate_scales + up_scales)
    return None


def _unscaled(node: fx.Node, root: nn.Module) -> tuple[fx.Node, Optional[torch.Tensor], list[fx.Node]]:
    """(p, s, the nodes that compute s and p * s) when `node` is p * s or s * p with s a constant; else
    (node, None, [])."""
    if _is_mul(node) and len(node.args) == 2 and not node.kwargs:
        for p, c in (node.args, node.args[::-1]):
            found = _constant(c, root) if isinstance(p, fx.Node) else None
            if found is not None:
                return p, found[0], [*found[1], node]
    return node, None, []


def _constant(arg, root: nn.Module) -> Optional[tuple[torch.Tensor, list[fx.Node]]]:
    """(value, the nodes that compute it) of an argument that depends on no input: a number, one of the module's
    tensors, or an op of those (evaluated twice, to refuse a random one)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg)), []
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        value = _attr(root, arg.target)
        return (value.detach(), [arg]) if isinstance(value, torch.Tensor) else None
    if arg.op not in ("call_function", "call_method") or not arg.all_input_nodes:
        return None
    parts = {n: _constant(n, root) for n in arg.all_input_nodes}
    if any(found is None for found in parts.values()):
        return None
    args, kwargs = fx.node.map_arg((arg.args, arg.kwargs), lambda n: parts[n][0])
    run = arg.target if arg.op == "call_function" else lambda x, *rest, **kw: getattr(x, arg.target)(*rest, **kw)
    try:
        with torch.no_grad():
            value, again = run(*args, **kwargs), run(*args, **kwargs)
    except Exception:
        return None
    if not isinstance(value, torch.Tensor) or not torch.equal(value, again):
        return None
    return value, [n for found in parts.values() for n in found[1]] + [arg]


def _scaled(projection: Optional[Projection], scale: Optional[torch.Tensor]) -> Optional[Projection]:
    """s (x W^T + b) = x (diag(s) W)^T + s b, for a floating s of shape [] or [..., out] (leading axes of size 1);
    the projection itself when there is no s, None when s is not such."""
    if projection is None or scale is None:
        return projection
    out = projection.out_features
    if not scale.is_floating_point() or scale.numel() not in (1, out) or \
            (scale.dim() and scale.shape[-1] != scale.numel()):
        return None
    column = scale.reshape(-1, 1).to(projection.weight)
    with torch.no_grad():
        bias = None if projection.bias is None else projection.bias * column[:, 0]
        return Projection(projection.weight * column, bias, projection.kind)


def _fused_halves(gate: fx.Node, up: fx.Node,
                  root: nn.Module) -> Optional[tuple[fx.Node, Projection, Projection, list[fx.Node]]]:
    """(fused projection node, gate half, up half, the split and getitem nodes) when gate and up are the two
    halves of one projection's output: p(x).chunk(2, -1), torch.split(p(x), f, -1), or p(x).view(..., 2, -1)
    indexed [..., i, :] (Moshi)."""
    halves = []
    for node in (gate, up):
        if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
            return None
        halves.append((node.args[0], _half_index(node.args[0], node.args[1])))
    (split, i_gate), (other, i_up) = halves
    if split is not other or {i_gate, i_up} != {0, 1} or not split.args or not isinstance(split.args[0], fx.Node):
        return None
    projection_node = split.args[0]
    projection = _projection(projection_node, root)
    if projection is None or projection.out_features % 2 or not _halves_last_axis(split, projection.out_features):
        return None
    width = projection.out_features // 2

    def half(i: int) -> Projection:
        rows = slice(i * width, (i + 1) * width)
        bias = None if projection.bias is None else projection.bias[rows]
        return Projection(projection.weight[rows], bias, projection.kind)

    shape_reads = _shape_reads(projection_node, split) if split.target in _VIEWS else []
    if shape_reads is None:
        return None
    return projection_node, half(i_gate), half(i_up), [*shape_reads, split, gate, up]


def _shape_reads(projection: fx.Node, view: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes that read the projection's shape for the view's sizes (p.shape, p.size() and their items), or
    None when the projection, or a size read off it, has a user outside them and the view."""
    reads, todo = [], [u for u in projection.users if u is not view]
    while todo:
        node = todo.pop()
        if not (node.op == "call_function" and (node.target is operator.getitem or
                                                 node.target is getattr and node.args[1:] == ("shape",))
                or node.op == "call_method" and node.target == "size"):
            return None
        reads.append(node)
        todo += [u for u in node.users if u is not view]
    return reads


_VIEWS = ("view", "reshape", torch.reshape)


def _half_index(split: fx.Node, index) -> Optional[int]:
    """Which half a getitem takes: chunk(...)[i], or view(..., 2, f)[..., i, :] (its second-last axis)."""
    if split.target not in _VIEWS:
        return index if isinstance(index, int) else None
    full = slice(None, None, None)
    if isinstance(index, tuple) and len(index) == 3 and index[0] is Ellipsis and index[2] == full:
        return index[1] if isinstance(index[1], int) else None
    return None


def _halves_last_axis(split: fx.Node, out_features: int) -> bool:
    """Whether `split` cuts its input into two equal halves along the last axis (a view, into a new
    second-last axis of 2)."""
    if split.target in _VIEWS:
        shape = split.args[1:] if len(split.args) > 2 else split.args[1] if len(split.args) == 2 else ()
        shape = list(shape) if isinstance(shape, (list, tuple)) else []
        return len(shape) >= 2 and shape[-2] == 2 and shape[-1] in (-1, out_features // 2)
    args, kwargs = list(split.args[1:]), dict(split.kwargs)
    dim = kwargs.pop("dim", args.pop(1) if len(args) > 1 else 0)
    if dim not in (-1, 2) or not args:
        return False
    if split.target in ("chunk", torch.chunk, _aten.chunk.default):
        return args[0] == 2
    if split.target in ("split", torch.split, _aten.split.Tensor, _aten.split_with_sizes.default):
        return args[0] in (out_features // 2, [out_features // 2] * 2)
    return False


def check_match(match: FFNMatch) -> Optional[str]:
    """Why this match cannot become an MoE layer, or None when it can."""
    up, down = match.projections["up"], match.projections["down"]
    gate = match.projections.get("gate")
    if up.out_features != down.in_features or up.in_features != down.out_features:
        return (f"shapes do not form an FFN: up is {up.in_features}->{up.out_features}, "
                f"down is {down.in_features}->{down.out_features}")
    if gate is not None and gate.weight.shape != up.weight.shape:
        return f"gate projection {tuple(gate.weight.shape)} and up projection {tuple(up.weight.shape)} differ"
    dtypes = {p.weight.dtype for p in match.projections.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"projection weights must share one floating dtype, found {sorted(map(str, dtypes))}"
    inner = [n for n in match.nodes if n is not match.output]
    escaping = [n.name for n in inner if any(u not in match.nodes for u in n.users)]
    if escaping:
        return f"intermediate values {escaping} are also used outside the FFN"
    if match.norm is not None and not _keeps_shape(match.norm_module, up):
        return (f"the module {match.norm.target} between the activation and the down projection does not map the "
                f"{up.out_features} hidden values to as many")
    return None


def _keeps_shape(module: nn.Module, up: Projection) -> bool:
    probe = torch.randn(2, up.out_features, generator=torch.Generator().manual_seed(0)).to(up.weight)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape
