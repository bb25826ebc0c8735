"""The FFN -> MoE pipeline, in the order it runs:

    1. capture   trace every candidate module (>= 2 projection children), children before parents
    2. match     find plain and gated FFN patterns in each graph; with example inputs, also in one whole-model
                 torch.export graph for the candidates fx could not trace (locate.py)
    3. check     keep the matches that can be rewritten, with the reason for each one that cannot
    4. validate  check the config against every site before anything changes (e.g. d_ff % E for split)
    5. calibrate with calibration data: record a sample of each site's inputs on the dense model (calibrate.py)
    6. build     make each site's MoE layer (experts + router), seeded per site, from its calibration if any
    7. rewrite   replace each site, smallest modules first, and attach the report to the model
    8. distill   with distill_steps > 0: fit each MoE layer to its dense FFN, first layer to last
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import MoEConfig
from ..errors import NoFFNFoundError
from ..model_io import Inputs, as_input_tuple
from ..moe import SiteCalibration, build_moe_layer
from .calibrate import distill, record_ffn_inputs
from .capture import candidate_modules, trace
from .locate import ModuleChain, locate_ffns
from .patterns import FFNMatch, check_match, match_ffns
from .report import ConversionReport, ModuleNote, SiteReport
from .rewrite import covers_whole_module, replace_submodule, rewrite_inline, rewrite_module_chain

SEARCHED_FOR = ("Linear/Conv1D -> activation -> Linear/Conv1D [-> Dropout] and gated "
                "down(act(gate(x)) * up(x)), in every module with two or more projection children")


@dataclass
class _Site:
    module_name: str
    module: nn.Module
    graph: Optional[fx.Graph]  # the module's fx graph; None for a site located with torch.export
    match: FFNMatch
    whole_module: bool
    report: SiteReport
    chain: Optional[ModuleChain] = None  # how a located site is rewritten


def _scan(model: nn.Module, example_inputs: Optional[Inputs]) -> tuple[list[_Site], list[ModuleNote]]:
    """Steps 1-3: every FFN site, with a report for each, and a note for each searched module without one."""
    sites, notes, untraceable = [], [], set()
    for name, module in candidate_modules(model):
        try:
            graph = trace(module)
        except Exception as error:  # torch.fx raises many kinds; each means "not traceable"
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            notes.append(ModuleNote(name, f"not traceable with torch.fx ({type(error).__name__}: {first_line})"))
            untraceable.add(name)
            continue
        matches = match_ffns(module, graph)
        if not matches:
            notes.append(ModuleNote(name, "traced; no FFN pattern"))
        for match in matches:
            whole = covers_whole_module(graph, match)
            site_name = name if whole else f"{name}:{match.up.target}..{match.down.target}".lstrip(":")
            report = _site_report(site_name, name, match, check_match(match))
            sites.append(_Site(name, module, graph, match, whole, report))
    if untraceable and example_inputs is not None:
        located, failure = locate_ffns(model, example_inputs, untraceable)
        if failure:
            notes.append(ModuleNote("", failure))
        for found in located:
            report = _site_report(found.name, found.block, found.match, found.reason,
                                  "located with torch.export (torch.fx cannot trace the block)")
            sites.append(_Site(found.block, model.get_submodule(found.block), None, found.match, False, report,
                               found.chain))
    return sites, notes


def _site_report(name: str, module: str, match: FFNMatch, skip_reason: Optional[str], note: str = "") -> SiteReport:
    ffn = match.dense_ffn()
    return SiteReport(name=name, module=module, pattern=match.pattern, d_model=ffn.d_model, d_ff=ffn.d_ff,
                      bias=ffn.up_bias is not None, gated=match.gated, action="skipped" if skip_reason else "found",
                      reason=skip_reason or note)


def find_ffn_blocks(model: nn.Module, example_inputs: Optional[Inputs] = None) -> ConversionReport:
    """Detection only: the FFN sites of `model` and why each searched module has none. Changes nothing.

    example_inputs (e.g. token ids): also search the modules torch.fx cannot trace, in a torch.export graph.
    """
    sites, notes = _scan(model, example_inputs)
    return ConversionReport(sites=[s.report for s in sites], notes=notes)


def convert(model: nn.Module, config: Optional[MoEConfig] = None, *, example_inputs: Optional[Inputs] = None,
            calibration_data: Optional[Iterable[Any]] = None, inplace: bool = False, progress: Optional[bool] = None,
            weights_follow: bool = False) -> nn.Module:
    """A copy of `model` (or `model` itself with inplace=True) whose dense FFNs are MoE layers.

    example_inputs (e.g. token ids [batch, seq]) let the pass also find FFNs inside modules that torch.fx cannot
    trace, with one torch.export of the whole model; only their shapes matter. calibration_data: batches (token
    id tensors, tuples of positional arguments or dicts of keyword arguments) the model is run on to build split
    experts from activations; the config's unset data-dependent fields then take their calibrated defaults
    (MoEConfig.with_calibration). weights_follow=True builds only the layout that saved weights are loaded into
    next (moe_compile.load), with no calibration data. The ConversionReport is attached as `.moe_report`.
    Deterministic for a given config.seed. Raises NoFFNFoundError, naming what was searched for, when there is
    nothing to convert.
    """
    config = config if config is not None else MoEConfig()
    if not isinstance(config, MoEConfig):
        raise TypeError(f"convert: config must be a MoEConfig, got {type(config).__name__}. "
                        "Build one with moe_compile.MoEConfig(num_experts=..., routing=...).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}.")
    inputs = None if example_inputs is None else as_input_tuple(example_inputs, "convert(example_inputs=...)")
    batches = None if calibration_data is None else list(calibration_data)
    if batches is not None:
        config = config.with_calibration()
    elif not weights_follow:
        config.check_calibration(has_data=False)
    target = model if inplace else copy.deepcopy(model)
    sites, notes = _scan(target, inputs)
    todo = [s for s in sites if s.report.action == "found"]
    if not todo:
        report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config)
        raise NoFFNFoundError(f"convert: found no dense FFN to convert in {type(model).__name__}. Searched for "
                              f"{SEARCHED_FOR}.\n{report.table()}\nIf the FFN is inside a module that does not "
                              "trace, pass example_inputs=(token_ids,) to search it with torch.export, give its MLP "
                              "its own submodule, or convert that submodule directly.")
    for site in todo:
        config.check_ffn_width(site.report.d_ff, site.report.name)
    if config.routing == "expert_choice":
        warnings.warn("expert_choice routing is not causal: an expert picks tokens by comparing every token of a "
                      "routing group, so a decoder's output at position t can depend on later positions. Use "
                      "switch or token_choice for autoregressive generation.", UserWarning, stacklevel=2)

    show = progress if progress is not None else len(todo) >= 8
    ffns = {site.report.name: _site_ffn(site) for site in todo}
    recorded = {} if batches is None or config.experts != "split" else \
        record_ffn_inputs(target, ffns, batches, config.calibration_tokens, config.seed, progress=progress is not False)
    layers = []
    for i, site in enumerate(tqdm(todo, desc="building experts", unit="site", disable=not show)):
        ffn = ffns[site.report.name]
        calibration = SiteCalibration.from_inputs(ffn, recorded.pop(site.report.name)) if recorded else None
        layers.append(build_moe_layer(ffn, config, seed=config.seed + i, calibration=calibration)
                      .train(site.module.training))
        if calibration is not None:
            site.report.calibration = calibration.results

    by_module: dict[str, list[tuple[_Site, nn.Module]]] = {}
    for site, layer in zip(todo, layers):
        by_module.setdefault(site.module_name, []).append((site, layer))
    for module_name, pairs in by_module.items():  # children before parents, as scanned
        first = pairs[0][0]
        if first.chain is not None:
            for site, layer in pairs:
                rewrite_module_chain(site.module, site.chain, layer)
                site.report.reason = (f"located with torch.export; {module_name}.{site.chain.up} is now the MoELayer, "
                                      f"{site.chain.act} and {site.chain.down} are identities")
        elif len(pairs) == 1 and first.whole_module:
            target = replace_submodule(target, module_name, pairs[0][1])
            first.report.reason = f"replaced module {type(first.module).__name__} with MoELayer"
        else:
            rewritten = rewrite_inline(first.module, first.graph, [(s.match, layer) for s, layer in pairs])
            target = replace_submodule(target, module_name, rewritten)
            for site, _ in pairs:
                site.report.reason = f"rewrote {module_name or '<root>'}'s fx graph to call an MoELayer"
        for site, _ in pairs:
            site.report.action = "converted"

    if batches is not None and config.distill_steps:
        fitted = distill(target, [(s.report.name, layer, ffns[s.report.name]) for s, layer in zip(todo, layers)],
                         batches, config.distill_steps, config.calibration_tokens, config.seed, progress=show)
        for site in todo:
            site.report.calibration.update({f"distill_{k}": v for k, v in fitted[site.report.name].items()})

    target.moe_report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config,
                                         example_inputs=None if inputs is None else
                                         [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                                          for t in inputs])
    return target


def _site_ffn(site: _Site):
    """The dense FFN a site's MoE layer replaces; a module chain's block still applies its own trailing dropout."""
    ffn = site.match.dense_ffn()
    return dataclasses.replace(ffn, dropout=0.0) if site.chain is not None else ffn
