"""Rewrite: put an MoE layer where an FFN match was.

    whole module   the match is the module's entire forward (an MLP submodule)  -> the parent's attribute now
                   holds the MoE layer; every class above it is untouched.
    inline         the match is part of a bigger forward (FFN written in the block; its graph from torch.fx, or
                   from torch.export for a block fx cannot trace) -> the block becomes an fx.GraphModule of its
                   rewritten graph, with the MoE layer as submodule `moe` and a call to it in place of the FFN's
                   nodes; the block's other parameters are the same objects as before. A torch.export graph
                   serves one kind of call: captured.py keeps one per kind.
    module chain   the match was located with torch.export, each step a module of its own (locate.py)
                   -> up becomes the MoE layer, the other steps identities; every forward is untouched.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .locate import ModuleChain
from .patterns import FFNMatch


def covers_whole_module(graph: fx.Graph, match: FFNMatch) -> bool:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    compute = {n for n in graph.nodes if n.op not in ("placeholder", "output")}
    return (placeholders == [match.input] and compute == set(match.nodes)
            and len(outputs) == 1 and outputs[0].args[0] is match.output)


def rewrite_inline(module: nn.Module, graph: fx.Graph,
                   replacements: list[tuple[FFNMatch, nn.Module]]) -> fx.GraphModule:
    """`module` as a GraphModule whose graph calls each MoE layer in place of its match's nodes."""
    for match, layer in replacements:
        name = _free_name(module, "moe")
        module.add_module(name, layer)
        with graph.inserting_before(match.nodes[0]):
            call = graph.call_module(name, (match.input,))
        match.output.replace_all_uses_with(call)
        for node in reversed(match.nodes):
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:  # the FFN's weights (torch.export)
        graph.erase_node(node)
    rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
    rewritten._forward_pre_hooks.update(module._forward_pre_hooks)  # the user's hooks on the block
    rewritten._forward_pre_hooks_with_kwargs.update(module._forward_pre_hooks_with_kwargs)
    rewritten.delete_all_unused_submodules()
    rewritten.train(module.training)
    return rewritten


def rewrite_module_chain(model: nn.Module, chain: ModuleChain, layer: nn.Module) -> None:
    """up(x) -> act -> [dropout ->] down  becomes  up = MoE(x), act = [dropout =] down = Identity."""
    replace_submodule(model, chain.up, layer)
    for name in chain.others:
        replace_submodule(model, name, nn.Identity())


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at qualified `name` of root, and wherever else root uses that same module object (a module
    shared across layers stays shared); returns the root (which is `new` itself when name is '')."""
    if not name:
        return new
    old = root.get_submodule(name)
    aliases = [(parent, attr) for parent in root.modules()  # _modules: named_children() skips repeats
               for attr, child in parent._modules.items() if child is old]
    for parent, attr in aliases:
        setattr(parent, attr, new)
    return root


def _free_name(module: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name
