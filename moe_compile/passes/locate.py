"""Locate: FFN sites the per-module torch.fx search cannot see, found in one whole-model torch.export graph.

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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import first_line
from ..model_io import ModelCall, ModelInputs
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

    @property
    def name(self) -> str:
        """'<block>:<up>..<down>', the steps relative to the block, as inline sites are named."""
        up, down = (relative(self.steps[role], self.block) for role in ("up", "down"))
        return f"{self.block}:{up}..{down}"


def locate_ffns(model: nn.Module, inputs: ModelInputs,
                covered: set[str]) -> tuple[list[LocatedFFN], Optional[str]]:
    """FFNs whose up projection is not in `covered` (qualified names of projections already found by torch.fx);
    (sites, None), or ([], why torch.export failed)."""
    try:
        with torch.no_grad():
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
