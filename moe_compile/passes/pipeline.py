"""The FFN -> MoE pipeline, in the order it runs:

    1. capture   trace every candidate module (>= 2 projection children), children before parents
    2. match     find plain and gated FFN patterns in each graph; when projections remain that fx did not see
                 (in blocks it cannot trace, or split over sibling modules), also in one whole-model torch.export
                 graph on example inputs (the user's, or a transformers model's own), which locates each FFN's
                 block (locate.py); a block whose FFN is not a chain of modules is captured with torch.export on
                 the arguments it receives in one forward (capture.py) and matched again; rewritten, it captures
                 itself again for each new kind of call it receives (captured.py). Module chains the export graph
                 does not show (it failed, or ran them inside an autograd Function) are located from the module
                 calls of one eager forward
    3. check     keep the matches that can be rewritten, with the reason for each one that cannot
    4. validate  check the config against every site before anything changes (e.g. d_ff % E for split, no split
                 of an FFN whose hidden norm couples its neurons)
    5. calibrate with calibration data: record a sample of each site's inputs on the dense model (calibrate.py)
    6. build     make each site's MoE layer (experts + router), seeded per site, from its calibration if any
    7. rewrite   replace each site, smallest modules first, and attach the report to the model
    8. distill   with distill_steps > 0: fit each MoE layer to its dense FFN, first layer to last
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import MoEConfig
from ..errors import MoECompileError, NoFFNFoundError, first_line
from ..model_io import EXAMPLE_INPUTS_HELP, Inputs, ModelInputs, as_model_inputs, default_inputs, widened
from ..moe import MoELayer, SiteCalibration, build_moe_layer, choose_shared_experts, split_problem
from .calibrate import distill, record_ffn_inputs
from .capture import Call, as_projection, candidate_modules, export_module, record_calls, trace
from .captured import CapturedBlock, Steps, find_by_steps
from .locate import LocatedFFN, ModuleChain, locate_by_calls, locate_ffns, relative
from .patterns import FFNMatch, check_match, match_ffns
from .report import ConversionReport, ModuleNote, SiteReport
from .rewrite import covers_whole_module, replace_submodule, rewrite_inline, rewrite_module_chain

SEARCHED_FOR = ("Linear/Conv1D -> activation -> Linear/Conv1D [-> Dropout] and gated "
                "down(act(gate(x)) * up(x)) (a norm module may come before down), in every module with two or more "
                "projection children")


@dataclass
class _Capture:
    source: nn.Module  # the dense block
    call: Call  # the call it was captured on
    steps: Steps  # the modules its FFN's steps ran in


@dataclass
class _Site:
    module_name: str
    module: nn.Module
    graph: Optional[fx.Graph]  # the module's fx graph (torch.fx, or torch.export for a captured block); None: chain
    match: FFNMatch
    whole_module: bool
    report: SiteReport
    chain: Optional[ModuleChain] = None  # how a located site is rewritten
    capture: Optional[_Capture] = None  # set when module and graph are the block's torch.export capture


def _scan(model: nn.Module, inputs: Optional[ModelInputs], given: bool) -> tuple[list[_Site], list[ModuleNote]]:
    """Steps 1-3: every FFN site, with a report for each, and a note for each searched module without one.

    given: the user passed the inputs, so search every projection fx did not see, even square ones."""
    sites, notes, traced = [], [], set()
    for name, module in candidate_modules(model):
        try:
            graph = trace(module)
        except Exception as error:  # torch.fx raises many kinds; each means "not traceable"
            notes.append(ModuleNote(name, f"not traceable with torch.fx ({first_line(error)})"))
            continue
        traced.add(name)
        matches = match_ffns(module, graph)
        if not matches:  # a branch on an argument that defaults to None may have hidden it (Moshi's layer_idx)
            graph, matches = _with_optional_as_none(module, graph)
        if not matches:
            notes.append(ModuleNote(name, "traced; no FFN pattern"))
        for match in matches:
            whole = covers_whole_module(graph, match)
            site_name = name if whole else f"{name}:{match.up.target}..{match.down.target}".lstrip(":")
            report = _site_report(site_name, name, match, check_match(match))
            sites.append(_Site(name, module, graph, match, whole, report))
    if not _unsearched_projections_could_form_ffn(model, traced, square=given):
        return sites, notes
    if inputs is None:
        notes.append(ModuleNote("", "projections that torch.fx could not see (in modules it cannot trace, or in "
                                    f"sibling modules) were not searched: pass {EXAMPLE_INPUTS_HELP}"))
        return sites, notes
    covered = {_join(s.module_name, node.target) for s in sites for node in (s.match.up, s.match.gate, s.match.down)
               if node is not None}
    located, failure = locate_ffns(model, inputs, covered)
    by_calls = locate_by_calls(model, inputs, covered | {found.steps["up"] for found in located})
    located += by_calls
    if failure:
        notes.append(ModuleNote("", f"{failure}; {len(by_calls)} FFNs whose steps are modules of their own located "
                                    "from the module calls of one forward instead"))
    fx_modules = {s.module_name for s in sites}
    to_capture = {f.block for f in located if f.chain is None and f.reason is None}
    held = {block: next((m for m in fx_modules if _inside(m, block)), None) for block in to_capture}
    captured = _capture(model, widened(inputs), {b for b in to_capture if held[b] is None})
    for found in located:
        if found.block in to_capture:
            sites.append(_captured_site(model, found, captured.get(found.block) or
                                        f"{found.block} also holds {held[found.block]}, which torch.fx rewrites"))
        else:
            report = _site_report(found.name, found.block, found.match, found.reason, f"located {found.how}")
            sites.append(_Site(found.block, model.get_submodule(found.block), None, found.match, False, report,
                               found.chain))
    return sites, notes


def _with_optional_as_none(module: nn.Module, graph: fx.Graph) -> tuple[fx.Graph, list[FFNMatch]]:
    """(graph, its matches) of the module traced with its None-default arguments as None, when that finds FFNs;
    else the plain graph and no match."""
    try:
        retraced = trace(module, optional_as_none=True)
    except Exception:  # torch.fx raises many kinds; each means "not traceable this way either"
        return graph, []
    matches = match_ffns(module, retraced) if retraced is not None else []
    return (retraced, matches) if matches else (graph, [])


def _captured_site(model: nn.Module, found: LocatedFFN,
                   captured: Union[tuple[Call, fx.GraphModule], str]) -> _Site:
    """The located FFN as a site of its block's torch.export graph, or skipped with the reason it cannot be."""
    block = model.get_submodule(found.block)
    steps = {role: relative(path, found.block) for role, path in found.steps.items()}
    match = None
    if not isinstance(captured, str):
        call, graph_module = captured
        match = find_by_steps(graph_module, steps)
        captured = captured if match is not None else f"not found again in the torch.export graph of {found.block}"
    if match is None:
        report = _site_report(found.name, found.block, found.match, found.reason or captured)
        return _Site(found.block, block, None, found.match, False, report)
    note = f"captured {found.block or '<root>'} with torch.export (torch.fx cannot trace it)"
    report = _site_report(found.name, found.block, match, found.reason or check_match(match), note)
    return _Site(found.block, graph_module, graph_module.graph, match, False, report,
                 capture=_Capture(block, call, steps))


def _capture(model: nn.Module, inputs: ModelInputs,
             blocks: set[str]) -> dict[str, Union[tuple[Call, fx.GraphModule], str]]:
    """Each block's (recorded call, torch.export graph on it) from one forward, or why there is none."""
    if not blocks:
        return {}
    modules = {block: model.get_submodule(block) for block in blocks}
    try:
        calls = record_calls(model, inputs, modules)
    except Exception as error:  # the model's own code raised on the widened example
        return {block: f"the model failed on the example inputs ({first_line(error)})" for block in blocks}
    captured: dict[str, Union[tuple[Call, fx.GraphModule], str]] = {}
    for block, module in modules.items():
        if block not in calls:
            captured[block] = f"{block} is not called by the model's forward"
            continue
        try:
            captured[block] = calls[block], export_module(module, calls[block])
        except Exception as error:  # torch.export raises many kinds; each means "this block did not export"
            captured[block] = f"torch.export of {block} failed ({first_line(error)})"
    return captured


def _unsearched_projections_could_form_ffn(model: nn.Module, traced: set[str], square: bool) -> bool:
    """Whether two projections outside every fx-traced module have FFN shapes (up d -> f, down f -> d); with
    square=False, d != f (an attention's d -> d query and output projections alone do not start a search)."""
    searched = {id(child) for name in traced for child in model.get_submodule(name).children()}
    shapes = Counter((p.in_features, p.out_features) for m in model.modules()
                     if id(m) not in searched and (p := as_projection(m)) is not None)
    return any(shapes[(out, inp)] > (out == inp) for inp, out in shapes if square or inp != out)


def _inside(path: str, block: str) -> bool:
    return not block or path == block or path.startswith(block + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _site_report(name: str, module: str, match: FFNMatch, skip_reason: Optional[str], note: str = "") -> SiteReport:
    ffn = match.dense_ffn()
    return SiteReport(name=name, module=module, pattern=match.pattern, d_model=ffn.d_model, d_ff=ffn.d_ff,
                      bias=ffn.up_bias is not None, gated=match.gated, action="skipped" if skip_reason else "found",
                      reason=skip_reason or note)


def find_ffn_blocks(model: nn.Module, example_inputs: Optional[Inputs] = None) -> ConversionReport:
    """Detection only: the FFN sites of `model` and why each searched module has none. Changes nothing.

    example_inputs: as for convert.
    """
    sites, notes = _scan(model, _search_inputs(model, example_inputs), given=example_inputs is not None)
    return ConversionReport(sites=[s.report for s in sites], notes=notes)


def convert(model: nn.Module, config: Optional[MoEConfig] = None, *,
            layer_configs: Optional[Mapping[str, Optional[MoEConfig]]] = None, example_inputs: Optional[Inputs] = None,
            calibration_data: Optional[Iterable[Any]] = None, inplace: bool = False, progress: Optional[bool] = None,
            weights_follow: bool = False) -> nn.Module:
    """A copy of `model` (or `model` itself with inplace=True) whose dense FFNs are MoE layers.

    layer_configs: per-site settings by site name (as find_ffn_blocks reports them): a MoEConfig that site gets
    instead of `config`, or None to keep it dense (moe_compile.optimize writes such plans).
    example_inputs (e.g. token ids [batch, seq], or a dict of keyword inputs): one forward on them records how
    the blocks torch.fx cannot trace are called, so that their FFNs are found and rewritten with torch.export;
    only their shapes and dtypes matter. A transformers model brings its own (`dummy_inputs`). calibration_data:
    batches (token id tensors, tuples of positional arguments or dicts of keyword arguments) the model is run on
    to build split experts from activations; the config's unset data-dependent fields then take their calibrated
    defaults (MoEConfig.with_calibration). weights_follow=True builds only the layout that saved weights are
    loaded into next (moe_compile.load), with no calibration data. The ConversionReport is attached as
    `.moe_report`. Deterministic for a given config.seed. Raises NoFFNFoundError, naming what was searched for,
    when there is nothing to convert.
    """
    config = config if config is not None else MoEConfig()
    if not isinstance(config, MoEConfig):
        raise TypeError(f"convert: config must be a MoEConfig, got {type(config).__name__}. "
                        "Build one with moe_compile.MoEConfig(num_experts=..., routing=...).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}.")
    already = [name for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if already:
        raise MoECompileError(f"convert: {type(model).__name__} is already converted ({len(already)} MoE layers: "
                              f"{', '.join(already[:3])}{', ...' if len(already) > 3 else ''}). Train or export it "
                              "as it is, or convert the dense model it came from.")
    layer_configs = _checked_layer_configs(layer_configs)
    given_names = set(layer_configs)
    given = None if example_inputs is None else as_model_inputs(example_inputs, "convert(example_inputs=...)")
    batches = None if calibration_data is None else list(calibration_data)
    target = model if inplace else copy.deepcopy(model)
    sites, notes = _scan(target, _search_inputs(target, given), given=given is not None)
    found = [s for s in sites if s.report.action == "found"]
    _keep_dense(found, layer_configs)
    todo = [s for s in found if s.report.action == "found"]
    if not todo:
        report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config)
        if found:
            raise MoECompileError(f"convert: layer_configs keeps every FFN site of {type(model).__name__} dense, so "
                                  "there is nothing to convert. Give at least one site a MoEConfig.")
        raise NoFFNFoundError(f"convert: found no dense FFN to convert in {type(model).__name__}. Searched for "
                              f"{SEARCHED_FOR}.\n{report.table()}\nIf the FFN is inside a module that does not "
                              f"trace, pass {EXAMPLE_INPUTS_HELP}; or give its MLP its own submodule, or convert that "
                              "submodule directly.")
    used = [config] * any(s.report.name not in layer_configs for s in todo) + [
        layer_configs[s.report.name] for s in todo if s.report.name in layer_configs]
    if batches is not None or not weights_follow:
        for used_config in {id(c): c for c in used}.values():
            used_config.check_calibration(has_data=batches is not None)
    if batches is not None:
        config = config.with_calibration()
        layer_configs = {name: c if c is None else c.with_calibration() for name, c in layer_configs.items()}
    configs = {s.report.name: layer_configs.get(s.report.name, config) for s in todo}
    ffns = {site.report.name: _site_ffn(site) for site in todo}
    for site in todo:
        configs[site.report.name].check_ffn_width(site.report.d_ff, site.report.name)
        problem = split_problem(ffns[site.report.name]) if configs[site.report.name].experts == "split" else None
        if problem:
            raise MoECompileError(f"convert: cannot split {site.report.name} into experts: {problem} (layer_configs "
                                  f"{{{site.report.name!r}: None}}).")
    if any(c.routing == "expert_choice" for c in configs.values()):
        warnings.warn("expert_choice routing is not causal: an expert picks tokens by comparing every token of a "
                      "routing group, so a decoder's output at position t can depend on later positions. Use "
                      "switch or token_choice for autoregressive generation.", UserWarning, stacklevel=2)

    show = progress if progress is not None else len(todo) >= 8
    fitted = {name: c for name, c in configs.items() if c.experts == "split"} if batches is not None else {}
    recorded = {} if not fitted else record_ffn_inputs(
        target, {name: ffns[name] for name in fitted}, batches, max(c.calibration_tokens for c in fitted.values()),
        config.seed, progress=progress is not False)
    layers, shared_errors = [], {}
    for i, site in enumerate(tqdm(todo, desc="building experts", unit="site", disable=not show)):
        name = site.report.name
        ffn, site_config = ffns[name], configs[name]
        inputs = recorded.pop(name, None)
        calibration = None if inputs is None else SiteCalibration.from_inputs(ffn, inputs)
        if calibration is not None and site_config.shared_experts == "auto":  # each site its count, from its data
            layer, chosen, shared_errors[name] = choose_shared_experts(site_config, ffn, calibration,
                                                                       site_config.seed + i)
            configs[name] = fitted[name] = dataclasses.replace(site_config, shared_experts=chosen)
        else:
            layer = build_moe_layer(ffn, site_config, seed=site_config.seed + i, calibration=calibration)
        layers.append(layer.train(site.module.training))
        if calibration is not None:
            site.report.calibration = calibration.results
            for shared, error in shared_errors.get(name, {}).items():
                site.report.calibration[f"error_{shared}_shared"] = error
    config, layer_configs = _recorded_configs(config, layer_configs, configs)

    by_module: dict[str, list[tuple[_Site, nn.Module]]] = {}
    for site, layer in zip(todo, layers):
        by_module.setdefault(site.module_name, []).append((site, layer))
    for module_name, pairs in by_module.items():  # children before parents, as scanned
        first = pairs[0][0]
        if first.chain is not None:
            for site, layer in pairs:
                rewrite_module_chain(target, site.chain, layer)
                site.report.reason = (f"{site.report.reason}; {site.chain.up} is now the MoELayer, "
                                      f"{' and '.join(site.chain.others)} identities")
        elif first.capture is not None:
            steps = [(site.capture.steps, layer) for site, layer in pairs]
            block = CapturedBlock(first.capture.source, module_name, first.capture.call, first.module, steps)
            target = replace_submodule(target, module_name, block)
            for site, _ in pairs:
                site.report.reason = f"rewrote {module_name or '<root>'}'s torch.export graph to call an MoELayer"
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
            if site.report.name in given_names:
                own = layer_configs[site.report.name]
                site.report.reason += f"; {own.experts} {own.top_k} of {own.num_experts} experts by layer_configs"
            if site.match.hidden_dropout is not None:
                site.report.reason += ("; the dropout on its hidden activations now acts on its output (training only)"
                                       if site.chain is not None and site.chain.dropout_stays else
                                       "; the dropout on its hidden activations (training only) is dropped")

    to_distill = [(s.report.name, layer, ffns[s.report.name], fitted[s.report.name].distill_steps)
                  for s, layer in zip(todo, layers) if s.report.name in fitted and fitted[s.report.name].distill_steps]
    if to_distill:
        results = distill(target, to_distill, batches, max(c.calibration_tokens for c in fitted.values()),
                          config.seed, progress=show)
        for site in todo:
            site.report.calibration.update({f"distill_{k}": v for k, v in results.get(site.report.name, {}).items()})

    names = {id(module): name for name, module in target.named_modules()}
    for site, layer in zip(todo, layers):
        site.report.layer = names[id(layer)]
    target.moe_report = ConversionReport(sites=[s.report for s in sites], notes=notes, config=config,
                                         layer_configs=layer_configs,
                                         example_inputs=None if given is None else given.to_spec())
    return target


def _recorded_configs(config: MoEConfig, layer_configs: dict[str, Optional[MoEConfig]],
                      configs: dict[str, MoEConfig]) -> tuple[MoEConfig, dict[str, Optional[MoEConfig]]]:
    """The (config, layer_configs) a converted model records once 'auto' shared counts are resolved per site: the
    sites of the model-wide config share its most common count (the fewer shared groups on a tie), the others
    are listed in layer_configs with their own."""
    layer_configs = {name: configs.get(name, c) for name, c in layer_configs.items()}
    own = {name: c for name, c in configs.items() if name not in layer_configs}
    if config.shared_experts == "auto" and own:
        counts = [c.shared_experts for c in own.values()]
        config = dataclasses.replace(config, shared_experts=min(set(counts), key=lambda s: (-counts.count(s), s)))
        layer_configs.update({name: c for name, c in own.items() if c.shared_experts != config.shared_experts})
    return config, layer_configs


def _checked_layer_configs(layer_configs: Optional[Mapping[str, Optional[MoEConfig]]]
                           ) -> dict[str, Optional[MoEConfig]]:
    if layer_configs is None:
        return {}
    if not isinstance(layer_configs, Mapping):
        raise TypeError(f"convert: layer_configs must map site names to a MoEConfig or None, got "
                        f"{type(layer_configs).__name__}.")
    wrong = [name for name, c in layer_configs.items() if c is not None and not isinstance(c, MoEConfig)]
    if wrong:
        raise TypeError(f"convert: layer_configs[{wrong[0]!r}] is a {type(layer_configs[wrong[0]]).__name__}; give "
                        "each site a MoEConfig, or None to keep it dense.")
    return dict(layer_configs)


def _keep_dense(found: list[_Site], layer_configs: dict[str, Optional[MoEConfig]]) -> None:
    """Mark the sites layer_configs keeps dense; fail on a name that is no convertible site."""
    names = [s.report.name for s in found]
    unknown = sorted(set(layer_configs) - set(names))
    if unknown:
        raise MoECompileError(f"convert: layer_configs names {', '.join(map(repr, unknown))}, which is no convertible "
                              f"FFN site of this model. The sites are: {', '.join(names)} (see find_ffn_blocks).")
    for site in found:
        if site.report.name in layer_configs and layer_configs[site.report.name] is None:
            site.report.action, site.report.reason = "kept dense", "kept dense by layer_configs"


def _search_inputs(model: nn.Module, example_inputs: Optional[Inputs]) -> Optional[ModelInputs]:
    """The user's example inputs, else the model's own (transformers), else None."""
    if example_inputs is not None:
        return as_model_inputs(example_inputs, "convert(example_inputs=...)")
    return default_inputs(model)


def _site_ffn(site: _Site):
    """The dense FFN a site's MoE layer replaces; a module chain's block still applies its own trailing dropout."""
    ffn = site.match.dense_ffn()
    return dataclasses.replace(ffn, dropout=0.0) if site.chain is not None else ffn
