"""The FFN -> MoE pipeline, in the order it runs:

    1. capture   trace every candidate module (>= 2 projection children), children before parents
    2. match     find plain and gated FFN patterns in each graph
    3. check     keep the matches that can be rewritten, with the reason for each one that cannot
    4. validate  check the config against every site before anything changes (e.g. d_ff % E for split)
    5. build     make each site's MoE layer (experts + router), seeded per site
    6. rewrite   replace each site, smallest modules first, and attach the report to the model
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import MoEConfig
from ..errors import NoFFNFoundError
from ..moe import build_moe_layer
from .capture import candidate_modules, trace
from .patterns import FFNMatch, check_match, match_ffns
from .report import ConversionReport, ModuleNote, SiteReport
from .rewrite import covers_whole_module, replace_submodule, rewrite_inline

SEARCHED_FOR = ("Linear/Conv1D -> activation -> Linear/Conv1D [-> Dropout] and gated "
                "down(act(gate(x)) * up(x)), in every module with two or more projection children")


@dataclass
class _Site:
    module_name: str
    module: nn.Module
    graph: fx.Graph
    match: FFNMatch
    whole_module: bool
    report: SiteReport


def _scan(model: nn.Module) -> tuple[list[_Site], list[ModuleNote]]:
    """Steps 1-3: every FFN site, with a report for each, and a note for each traced module without one."""
    sites, notes = [], []
    for name, module in candidate_modules(model):
        try:
            graph = trace(module)
        except Exception as error:  # torch.fx raises many kinds; each means "not traceable"
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            notes.append(ModuleNote(name, f"not traceable with torch.fx ({type(error).__name__}: {first_line})"))
            continue
        matches = match_ffns(module, graph)
        if not matches:
            notes.append(ModuleNote(name, "traced; no FFN pattern"))
        for match in matches:
            whole = covers_whole_module(graph, match)
            site_name = name if whole else f"{name}:{match.up.target}..{match.down.target}".lstrip(":")
            ffn = match.dense_ffn()
            skip_reason = check_match(match)
            report = SiteReport(name=site_name, module=name, pattern=match.pattern, d_model=ffn.d_model,
                                d_ff=ffn.d_ff, bias=ffn.up_bias is not None, gated=match.gated,
                                action="skipped" if skip_reason else "found", reason=skip_reason or "")
            sites.append(_Site(name, module, graph, match, whole, report))
    return sites, notes


def find_ffn_blocks(model: nn.Module) -> ConversionReport:
    """Detection only: the FFN sites of `model` and why each traced module has none. Changes nothing."""
    sites, notes = _scan(model)
    return ConversionReport(sites=[s.report for s in sites], notes=notes)


def convert(model: nn.Module, config: Optional[MoEConfig] = None, *, inplace: bool = False,
            progress: Optional[bool] = None) -> nn.Module:
    """A copy of `model` (or `model` itself with inplace=True) whose dense FFNs are MoE layers.

    The ConversionReport is attached as `.moe_report`. Deterministic for a given config.seed. Raises
    NoFFNFoundError, naming what was searched for, when there is nothing to convert.
    """
    config = config if config is not None else MoEConfig()
    if not isinstance(config, MoEConfig):
        raise TypeError(f"convert: config must be a MoEConfig, got {type(config).__name__}. "
                        "Build one with moe_compile.MoEConfig(num_experts=..., routing=...).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}.")
    target = model if inplace else copy.deepcopy(model)
    sites, notes = _scan(target)
    todo = [s for s in sites if s.report.action == "found"]
    if not todo:
        report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config)
        raise NoFFNFoundError(f"convert: found no dense FFN to convert in {type(model).__name__}. Searched for "
                              f"{SEARCHED_FOR}.\n{report.table()}\nIf the FFN is inside a module that does not "
                              "trace, give its MLP its own submodule, or convert that submodule directly.")
    for site in todo:
        config.check_ffn_width(site.report.d_ff, site.report.name)
    if config.routing == "expert_choice":
        warnings.warn("expert_choice routing is not causal: an expert picks tokens by comparing every token of a "
                      "routing group, so a decoder's output at position t can depend on later positions. Use "
                      "switch or token_choice for autoregressive generation.", UserWarning, stacklevel=2)

    show = progress if progress is not None else len(todo) >= 8
    layers = [build_moe_layer(site.match.dense_ffn(), config, seed=config.seed + i).train(site.module.training)
              for i, site in enumerate(tqdm(todo, desc="building experts", unit="site", disable=not show))]

    by_module: dict[str, list[tuple[_Site, nn.Module]]] = {}
    for site, layer in zip(todo, layers):
        by_module.setdefault(site.module_name, []).append((site, layer))
    for module_name, pairs in by_module.items():  # children before parents, as scanned
        first = pairs[0][0]
        if len(pairs) == 1 and first.whole_module:
            target = replace_submodule(target, module_name, pairs[0][1])
            first.report.reason = f"replaced module {type(first.module).__name__} with MoELayer"
        else:
            rewritten = rewrite_inline(first.module, first.graph, [(s.match, layer) for s, layer in pairs])
            target = replace_submodule(target, module_name, rewritten)
            for site, _ in pairs:
                site.report.reason = f"rewrote {module_name or '<root>'}'s fx graph to call an MoELayer"
        for site, _ in pairs:
            site.report.action = "converted"

    target.moe_report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config)
    return target
