"""Calibration: run the model on the caller's batches and record a bounded sample of each FFN site's inputs;
after the rewrite, optionally distil each MoE layer to its dense FFN (moe/distill.py), layer by layer.

A forward pre-hook on each site's up projection (the module whose weight is the site's W_up, whatever the
site's kind) keeps a uniform sample of at most `cap` input rows per site (reservoir sampling, seeded); the
MoE side turns them into activations (moe/calibration.py). Batches are token-id tensors, tuples of positional
arguments or dicts of keyword arguments (as a tokenizer returns).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..moe import DenseFFN, MoELayer
from ..moe.distill import distill_layer


class InputSample:
    """A uniform sample of at most `cap` rows of everything `add` saw (vectorised reservoir sampling)."""

    def __init__(self, cap: int, generator: torch.Generator):
        self.cap, self.generator, self.seen = cap, generator, 0
        self.rows: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if self.rows is None:
            self.rows = rows.new_empty(0, rows.shape[1])
        room = self.cap - len(self.rows)
        if room > 0:
            self.rows = torch.cat([self.rows, rows[:room]])
            self.seen += min(room, len(rows))
            rows = rows[room:]
        if len(rows):
            index = self.seen + torch.arange(1, len(rows) + 1)  # 1-based position of each row in the stream
            slot = (torch.rand(len(rows), generator=self.generator) * index).long()
            keep = slot < self.cap
            self.rows[slot[keep]] = rows[keep]  # later rows win a shared slot, as sequential sampling would
            self.seen += len(rows)


class _Recorded(Exception):
    """Raised by a hook to stop a forward pass once the layers of interest have seen their inputs."""


def record_ffn_inputs(model: nn.Module, ffns: dict[str, DenseFFN], batches: Iterable[Any], cap: int, seed: int,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """{site: [n <= cap, d_model] sampled inputs} from running `model` on every batch (eval mode, no grad). After
    the first batch, each forward stops once the sites have been called as often as in the first."""
    samples = {name: InputSample(cap, torch.Generator().manual_seed(seed + i)) for i, name in enumerate(ffns)}
    calls = {"now": 0, "whole": None}  # hook calls in this forward, and in a whole one (the first batch's)

    def record(sample: InputSample, x: torch.Tensor) -> None:
        sample.add(x)
        calls["now"] += 1
        if calls["now"] == calls["whole"]:
            raise _Recorded  # every site has seen this batch: the rest of the forward (an LM head) is not needed

    hooks = []
    for name, ffn in ffns.items():
        module = _module_holding(model, ffn.up_weight)
        if module is None:
            raise ValueError(f"convert(calibration_data=...): the up projection of site {name!r} is not a module "
                             "with a weight, so its inputs cannot be recorded. Give the FFN nn.Linear layers, or "
                             "convert without calibration_data.")
        hooks.append(module.register_forward_pre_hook(lambda _m, args, s=samples[name]: record(s, args[0])))
    try:
        with _eval(model), torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                calls["now"] = 0
                with contextlib.suppress(_Recorded):
                    call_model(model, batch)
                calls["whole"] = calls["whole"] or calls["now"]
    finally:
        for hook in hooks:
            hook.remove()
    empty = [name for name, sample in samples.items() if sample.rows is None]
    if empty:
        raise ValueError(f"convert(calibration_data=...): sites {empty} saw no tokens. Pass a non-empty iterable of "
                         "batches that runs through those FFNs.")
    return {name: sample.rows for name, sample in samples.items()}


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(batch), model(*batch) or model(**batch), by the batch's type."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return model(move(batch))
    if isinstance(batch, (tuple, list)):
        return model(*map(move, batch))
    if isinstance(batch, dict):
        return model(**{k: move(v) for k, v in batch.items()})
    raise TypeError(f"convert(calibration_data=...): a batch must be a tensor of token ids, a tuple of positional "
                    f"arguments or a dict of keyword arguments, got {type(batch).__name__}.")


def _module_holding(model: nn.Module, weight: torch.Tensor) -> Optional[nn.Module]:
    """The module whose own `weight` shares storage with `weight` (Conv1D stores W^T; it is the same storage)."""
    target = weight.untyped_storage().data_ptr()
    for module in model.modules():
        own = module._parameters.get("weight")
        if own is not None and own.untyped_storage().data_ptr() == target:
            return module
    return None


@contextlib.contextmanager
def _eval(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def distill(model: nn.Module, sites: list[tuple[str, MoELayer, DenseFFN, int]], batches: list[Any], cap: int,
            seed: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """Fit each MoE layer, first to last, to its dense FFN on that layer's inputs in the converted model, for
    the site's number of optimiser steps.

    Layer l's inputs are recorded after layers < l were fitted (not teacher-forced); each forward stops at l.
    """
    results = {}
    for i, (name, layer, ffn, steps) in enumerate(tqdm(sites, desc="distilling", unit="layer", disable=not progress)):
        sample = InputSample(cap, torch.Generator().manual_seed(seed + i))

        def record(_module, args, sample=sample):
            sample.add(args[0])
            raise _Recorded

        hook = layer.register_forward_pre_hook(record)
        try:
            with _eval(model), torch.no_grad():
                for batch in batches:
                    with contextlib.suppress(_Recorded):
                        call_model(model, batch)
        finally:
            hook.remove()
        results[name] = distill_layer(layer, ffn, sample.rows, steps, seed + i)
    return results
