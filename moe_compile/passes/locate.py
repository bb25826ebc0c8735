"""Locate: FFN sites inside modules that torch.fx cannot trace, found in one whole-model torch.export graph.

torch.export runs the model on example inputs and records each ATen op with the module it ran in
(`nn_module_stack`), so it sees through forwards that fx cannot trace (KV caches, tuple unpacking, mask
helpers). The same FFN patterns are matched on that graph. A plain FFN whose three steps are three child-module
calls of one block, each module used once, is rewritten without touching the block's forward:

    block.up(x) -> block.act(.) -> block.down(.)    ->    block.up = MoE, block.act = block.down = Identity

Gated FFNs and activations computed in the block's own code would need that code to change: they are
reported with the reason, not rewritten.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..model_io import Inputs, LogitsModel, as_input_tuple
from .patterns import FFNMatch, check_match, match_ffns, module_path

_WRAPPER = "model."  # LogitsModel holds the model as `model`


@dataclass
class ModuleChain:
    """An FFN made of three child modules of `block`, called one after the other."""

    block: str
    up: str  # attribute names within the block
    act: str
    down: str


@dataclass
class LocatedFFN:
    match: FFNMatch  # on the exported graph; its projections hold the model's own weights
    block: str  # qualified name of the block whose forward computes the FFN
    name: str  # "<block>:<up>..<down>", as inline sites are named
    chain: Optional[ModuleChain]  # how to rewrite it, when it can be
    reason: Optional[str]  # why it cannot be rewritten


def locate_ffns(model: nn.Module, example_inputs: Inputs, blocks: set[str]) -> tuple[list[LocatedFFN], Optional[str]]:
    """FFNs whose block is one of `blocks` (modules fx could not trace); (sites, None) or ([], why export failed)."""
    inputs = as_input_tuple(example_inputs, "convert(example_inputs=...)")
    try:
        with torch.no_grad():
            program = torch.export.export(LogitsModel(model), inputs, strict=False)
    except Exception as error:  # torch.export raises many kinds; each means "this model did not export"
        return [], f"torch.export failed ({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]})"
    graph_module = program.module()
    ops_per_module = Counter(_owner(n) for n in graph_module.graph.nodes if n.op == "call_function")
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    found = []
    for match in match_ffns(graph_module, graph_module.graph):
        block = _owner(match.up).rpartition(".")[0]
        if block not in blocks:
            continue
        chain, reason = _module_chain(model, match, block, ops_per_module, uses)
        up, down = (_owner(node).rpartition(".")[2] for node in (match.up, match.down))
        found.append(LocatedFFN(match, block, f"{block}:{up}..{down}", chain, check_match(match) or reason))
    return found, None


def _owner(node: fx.Node) -> str:
    """Qualified name, in the user's model, of the module a node ran in."""
    return module_path(node)[0].removeprefix(_WRAPPER)


def _module_chain(model: nn.Module, match: FFNMatch, block: str, ops_per_module: Counter,
                  uses: Counter) -> tuple[Optional[ModuleChain], Optional[str]]:
    if match.gated:
        return None, f"gated FFN computed in {block}'s own forward, which torch.fx cannot trace"
    owners = {role: _owner(node) for role, node in (("up", match.up), ("act", match.act), ("down", match.down))}
    if owners["act"] == block:
        return None, (f"its activation is computed in {block}'s own forward, which torch.fx cannot trace; "
                      "make it a child module (e.g. nn.GELU()) or give the FFN its own submodule")
    outside = [path for path in owners.values() if path.rpartition(".")[0] != block]
    if outside:
        return None, f"{', '.join(outside)} are not child modules of {block}"
    reused = [path for path in owners.values()
              if ops_per_module[path] != 1 or uses[id(model.get_submodule(path))] != 1]
    if reused:
        return None, f"{', '.join(reused)} also run elsewhere, so they cannot be replaced"
    up, act, down = (owners[role].rpartition(".")[2] for role in ("up", "act", "down"))
    return ModuleChain(block, up, act, down), None
