"""Locate: FFN sites the per-module torch.fx search cannot see, found in one whole-model torch.export graph, or
from the module calls of one eager forward where that graph holds none.

torch.export runs the model on example inputs and records each ATen op with the module it ran in
(`nn_module_stack`), so it sees through forwards that fx cannot trace (KV caches, mask helpers, sizes read at run
time) and across module boundaries: an FFN whose projections live in sibling modules (BERT's intermediate.dense
and output.dense) is found in their common parent. The same FFN patterns are matched on that graph. Each located
FFN belongs to a block, the innermost module whose forward runs all of its ops, and is rewritten one of two ways:

    module chain   every step up -> act -> down is the only op of its own module, used once: up becomes the MoE
                   layer, the other steps nn.Identity; every forward's code (residuals, LayerNorms, trailing
                   dropout, KV caches) runs as before. A dropout between act and down that is a module of its own
                   becomes nn.Identity too; one written in the forward (BART's F.dropout) then acts on the MoE
                   output (in training only; the report says so).
    capture        anything else (a functional or gated activation written in the block's forward): the pipeline
                   captures the block with torch.export on the arguments it receives (capture.export_module) and
                   rewrites that graph like an inline fx site.

Where torch.export fails on the whole model (Longformer's data-dependent attention) or runs the FFNs where its
graph does not show them (Reformer's reversible layers, an autograd Function), `locate_by_calls` finds module
chains from forward hooks: the same tensor leaves one step and enters the next. Hooks do not see functional code,
so a chain is kept only when the model's outputs stay the same with its steps run as one module.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import first_line
from ..model_io import ModelCall, ModelInputs
from .capture import as_projection, trace
from .patterns import FFNMatch, check_match, match_ffns, module_path

_WRAPPER = "model"  # ModelCall holds the model as `model`


@dataclass
class ModuleChain:
    """An FFN whose steps are modules called one after the other: `up` (qualified name) and the rest."""

    up: str
    others: list[str]
    dropout_stays: bool = False  # a dropout between act and down, written in the forward, stays in place


@dataclass
class LocatedFFN:
    match: FFNMatch  # on the whole-model graph; its projections hold the model's own weights
    block: str  # qualified name of the innermost module whose forward runs the whole FFN
    steps: dict[str, str]  # role (up, gate, down) -> qualified name of the module it ran in
    chain: Optional[ModuleChain]  # set when the FFN can be rewritten as a module chain
    reason: Optional[str]  # why it cannot be rewritten at all
    how: str = "with torch.export"  # how it was located, for the report

    @property
    def name(self) -> str:
        """'<block>:<up>..<down>', the steps relative to the block, as inline sites are named."""
        up, down = (relative(self.steps[role], self.block) for role in ("up", "down"))
        return f"{self.block}:{up}..{down}"


def locate_ffns(model: nn.Module, inputs: ModelInputs,
                covered: set[str]) -> tuple[list[LocatedFFN], Optional[str]]:
    """FFNs whose up projection is not in `covered` (qualified names of projections already found by torch.fx);
    (sites, None), or ([], why torch.export failed)."""
    try:  # a failing export prints its whole graph to stderr; its first line goes into the report instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(ModelCall(model), inputs.args, inputs.kwargs, strict=False)
    except Exception as error:  # torch.export raises many kinds; each means "this model did not export"
        return [], f"torch.export failed ({first_line(error)})"
    graph_module = program.module()
    ops_per_module = Counter(_owner(n) for n in graph_module.graph.nodes if n.op == "call_function")
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    found, seen = [], set()
    for match in match_ffns(graph_module, graph_module.graph):
        steps = {role: _owner(getattr(match, role)) for role in ("up", "gate", "down") if getattr(match, role)}
        if steps["up"] in covered or tuple(steps.values()) in seen:  # a module shared by layers runs many times
            continue
        seen.add(tuple(steps.values()))
        block = _common_parent([_owner(node) for node in match.nodes])
        chain = _module_chain(model, match, ops_per_module, uses)
        found.append(LocatedFFN(match, block, steps, chain, check_match(match)))
    return found, None


def locate_by_calls(model: nn.Module, inputs: ModelInputs, covered: set[str]) -> list[LocatedFFN]:
    """Module-chain FFNs found from the module calls of one eager forward, where the torch.export graph has none (it
    failed, or ran them inside an autograd Function): a projection's output is the input of an activation module,
    whose output (through Dropout modules that pass it on unchanged) is the input of a projection back to the width;
    the same tensors, not equal values. Hooks do not see functional code, so each chain is kept only when the model
    computes the same outputs with the chain's steps run as one module (nothing else reads its hidden tensors)."""
    calls, reference = _leaf_calls(model, inputs)
    made = {id(c.output): c for c in calls if c.output is not c.input}  # who computed each tensor
    passed = {}  # tensor -> the calls that returned it unchanged (dropout in eval)
    for c in calls:
        if c.output is c.input:
            passed.setdefault(id(c.input), []).append(c)
    chains = {}
    for down in calls:
        act = made.get(id(down.input))
        up = made.get(id(act.input)) if act is not None else None
        if up is None or up.name in covered or as_projection(down.module) is None or \
                as_projection(up.module) is None or as_projection(act.module) is not None:
            continue
        dropouts = [c for c in passed.get(id(down.input), []) if isinstance(c.module, nn.Dropout)][:1]
        chains[tuple(c.name for c in (up, act, *dropouts, down))] = [c.module for c in (up, act, *dropouts, down)]
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    steps_used = Counter(name for names in chains for name in names)
    found = []
    for names, modules in chains.items():
        if any(steps_used[name] != 1 or uses[id(m)] != 1 for name, m in zip(names, modules)):
            continue  # a module in two chains, or shared across layers
        sequence = nn.Sequential(*modules)
        match = next(iter(match_ffns(sequence, trace(sequence))), None)
        if match is None or match.gated:  # the act is no known activation, or the shapes are no FFN's
            continue
        found.append(LocatedFFN(match, _common_parent(list(names)), {"up": names[0], "down": names[-1]},
                                ModuleChain(names[0], list(names[1:])), check_match(match),
                                how="from the module calls of one forward"))
    if not found or _same_outputs_as_chains(model, inputs, found, reference):
        return found
    return [f for f in found if _same_outputs_as_chains(model, inputs, [f], reference)]


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


def _leaf_calls(model: nn.Module, inputs: ModelInputs) -> tuple[list[_Call], tuple[torch.Tensor, ...]]:
    """Every call of a childless module on one tensor that returned one tensor in one eager forward, and the
    forward's outputs."""
    calls = []

    def recorder(name: str):
        def record(module: nn.Module, args: tuple, output) -> None:
            if len(args) >= 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append(_Call(name, module, args[0], output))
        return record

    hooks = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules()
             if name and next(module.children(), None) is None]
    try:
        outputs = _seeded_forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, outputs


def _same_outputs_as_chains(model: nn.Module, inputs: ModelInputs, found: list[LocatedFFN],
                            reference: tuple[torch.Tensor, ...]) -> bool:
    """Whether the model's outputs stay the same with each chain's up running the whole chain and its other steps
    identities, as the rewrite will do (the model is restored afterwards)."""
    swapped = []
    for f in found:
        steps = [f.chain.up, *f.chain.others]
        originals = [model.get_submodule(name) for name in steps]
        swapped += [(name, module) for name, module in zip(steps, originals)]
        for name, new in zip(steps, [nn.Sequential(*originals)] + [nn.Identity()] * len(f.chain.others)):
            _set_submodule(model, name, new)
    try:
        outputs = _seeded_forward(model, inputs)
    finally:
        for name, module in swapped:
            _set_submodule(model, name, module)
    return len(outputs) == len(reference) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(outputs, reference))


def _seeded_forward(model: nn.Module, inputs: ModelInputs) -> tuple[torch.Tensor, ...]:
    """The model's outputs, its random draws (LSH hashing, say) the same at every call."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return ModelCall(model)(*inputs.args, **inputs.kwargs)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent), attribute, module)


def relative(path: str, block: str) -> str:
    """`path` relative to the module `block` ('' for the block itself)."""
    return path if not block else path.removeprefix(block).removeprefix(".")


def _owner(node: fx.Node) -> str:
    """Qualified name, in the user's model, of the module a node ran in."""
    path = module_path(node)[0]
    return "" if path == _WRAPPER else path.removeprefix(_WRAPPER + ".")


def _common_parent(paths: list[str]) -> str:
    """The innermost module that contains every module of `paths` (the longest common prefix of their names)."""
    common = []
    for names in zip(*(p.split(".") if p else [] for p in paths)):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def _module_chain(model: nn.Module, match: FFNMatch, ops_per_module: Counter,
                  uses: Counter) -> Optional[ModuleChain]:
    """The chain up -> act [-> dropout] -> down, when each step is the one op of a childless module used once (a
    dropout written in the forward is left where it is)."""
    if match.gated or match.scales:  # a constant scale written in the forward would then apply twice
        return None
    dropout = match.hidden_dropout
    if dropout is not None and ops_per_module[_owner(dropout)] != 1:
        dropout = None  # functional, in the block's own code: it stays, and then acts on the MoE output
    steps = [_owner(n) for n in (match.up, match.act, dropout, match.down) if n is not None]
    if len(set(steps)) != len(steps) or "" in steps:
        return None
    ops = {path: 1 for path in steps} | {_owner(match.act): 1 + len(match.act_region)}
    for path in steps:
        module = model.get_submodule(path)
        if ops_per_module[path] != ops[path] or uses[id(module)] != 1 or next(module.children(), None) is not None:
            return None
    return ModuleChain(steps[0], steps[1:], dropout_stays=dropout is not match.hidden_dropout)
