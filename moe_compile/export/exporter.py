"""moe_compile.export: a converted model -> one ONNX file, each MoE layer lowered for a target.

Targets:
  portable  standard ONNX ops only (no custom domain, no Loop/If): the MoE layer's own capacity-padded forward,
            exported by the dynamo exporter. Tokens go into per-expert buffers of C slots, one batched MatMul
            per projection runs every expert, the outputs are added back with their gates. C is integer
            arithmetic on the symbolic token count, so the graph is static per token count and has the same
            nodes for any number of experts. Dropless token choice takes C = T (one expert may receive every
            token, so nothing is ever dropped), or C = min(ceil(cf T k / E), T) with export's capacity_factor.
  ort       each MoE layer that com.microsoft.MoE expresses exactly becomes that one node (see ort_moe.py);
            every other layer keeps the portable lowering and the report says why (or, with
            fallback=False, export raises LoweringError).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import LoweringError, MoECompileError, first_line
from ..model_io import EXAMPLE_INPUTS_HELP, Inputs, ModelCall, ModelInputs, as_model_inputs, widened
from ..moe import MoELayer, iter_moe_layers
from ..passes.rewrite import replace_submodule
from .ort_moe import OP_NAME, OrtMoE, may_drop, ort_unsupported_reason
from .report import ExportReport, LayerLowering

TARGETS = ("portable", "ort")
DTYPES = (torch.float32, torch.float16)


def export(model: nn.Module, example_inputs: Inputs, path: Union[str, os.PathLike], *, target: str = "portable",
           dynamic: bool = True, dtype: Optional[torch.dtype] = None, capacity_factor: Optional[float] = None,
           fallback: bool = True, opset: Optional[int] = None) -> ExportReport:
    """Write `model` (called on `example_inputs`) to the ONNX file `path`; every output tensor of the model becomes
    an ONNX output named after its field (logits, last_hidden_state, ...; see model_io.named_outputs).

    example_inputs: a tensor, tuple or dict of tensors, dims 0 and 1 batch and sequence; only shapes and dtypes
    matter, so a batch-1 or sequence-1 example is tiled internally. The model is deep-copied and put in eval mode
    (and cast to `dtype`, float32 or float16); the caller's model is untouched. With dynamic=True the batch and
    sequence axes of every input are dynamic. capacity_factor sets C = min(ceil(cf T k / E), T) on dropless
    token-choice layers lowered portably (faster, but may drop tokens the eager model keeps; the report says so).
    fallback=False makes target="ort" raise LoweringError for a layer com.microsoft.MoE cannot express instead of
    lowering it portably. opset: the ONNX opset (default: the exporter's).
    """
    if target not in TARGETS:
        raise LoweringError(f"export: unknown target {target!r}. Choose one of {', '.join(TARGETS)} "
                            "('portable' runs on any ONNX runtime; 'ort' uses ONNX Runtime's com.microsoft.MoE).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be a torch.nn.Module, got {type(model).__name__}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"export: dtype {dtype} is not supported. Use torch.float32 or torch.float16.")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"export: capacity_factor must be > 0, got {capacity_factor!r}. Use 1.25, say, or None "
                         "(dropless, C = T).")
    inputs = as_model_inputs(example_inputs, "export")
    _check_example(model, inputs)
    _check_writable(path)

    work = copy.deepcopy(model).eval()
    example = widened(inputs) if dynamic else inputs
    try:  # eager, before lowering: the output names, and a clear error when the example does not fit the model
        output_names = list(ModelCall(work).named(example))
    except Exception as error:  # the model's own code raises; say which inputs it was given
        raise MoECompileError(f"export: {type(model).__name__} fails on the example inputs ({inputs.describe(model)}): "
                              f"{first_line(error, 200)} Pass "
                              f"{EXAMPLE_INPUTS_HELP}.") from None
    if dtype is not None:
        work = work.to(dtype)
    dtype_name = str(dtype or next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32))
    layers = []
    for name, layer in list(iter_moe_layers(work)):
        replacement, lowering = _lower(name, layer, target, capacity_factor, fallback)
        layers.append(lowering)
        if replacement is not None:
            work = replace_submodule(work, name, replacement)

    dynamic_shapes = None
    if dynamic:  # dims 0 and 1 (batch, sequence) of every input
        axes = lambda t: {i: torch.export.Dim.DYNAMIC for i in range(min(t.dim(), 2))}  # noqa: E731
        dynamic_shapes = {"args": tuple(axes(t) for t in example.tensors())}
    with _quiet_exporter():  # keyword inputs travel positionally (see ModelCall)
        program = torch.onnx.export(ModelCall(work, tuple(example.kwargs)).eval(), tuple(example.tensors()),
                                    dynamo=True, dynamic_shapes=dynamic_shapes, input_names=inputs.names(model),
                                    output_names=output_names, opset_version=opset, verbose=False)
    program.save(os.fspath(path))
    return ExportReport(path=os.fspath(path), target=target, dtype=dtype_name.removeprefix("torch."), layers=layers,
                        opset=_opset_of(program))


def _check_example(model: nn.Module, inputs: ModelInputs) -> None:
    """Every input is [batch, seq, ...]; token ids are integers."""
    for name, t in zip(inputs.names(model), inputs.tensors()):
        expected = f"{type(model).__name__}.forward's {name!r}"
        if t.dim() < 2:
            raise MoECompileError(f"export: example input {name!r} has shape {list(t.shape)}, but every input must be "
                                  f"[batch, seq, ...] (token ids: [batch, seq]); add the batch axis ({name}[None]) "
                                  f"for {expected}.")
        if (name.endswith("_ids") or name == "idx") and t.is_floating_point():
            raise MoECompileError(f"export: example input {name!r} is {str(t.dtype).removeprefix('torch.')}, but "
                                  f"{expected} takes integer token ids [batch, seq] (torch.long). Pass token ids, or "
                                  "embeddings through the model's embedding input (e.g. inputs_embeds=...).")


def _check_writable(path: Union[str, os.PathLike]) -> None:
    """Fail before the export, not after it, when `path` cannot be written."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    problem = ("is a directory" if os.path.isdir(target) else
               f"its directory {folder!r} does not exist" if not os.path.isdir(folder) else
               "it is not writable" if os.path.exists(target) and not os.access(target, os.W_OK) else
               f"its directory {folder!r} is not writable" if not os.access(folder, os.W_OK) else None)
    if problem:
        raise MoECompileError(f"export: cannot write the ONNX file {os.fspath(path)!r}: {problem}. Pass a file path "
                              "in an existing, writable directory.")


def _lower(name: str, layer: MoELayer, target: str, capacity_factor: Optional[float],
           fallback: bool) -> tuple[Optional[nn.Module], LayerLowering]:
    """The module that replaces `layer` in the copy (None: keep it, portable) and its line of the report."""
    router = layer.router
    routing = router.routing
    reason = ort_unsupported_reason(layer) if target == "ort" else None
    if target == "ort" and reason is None:
        note = "" if capacity_factor is None else "capacity_factor ignored: the op is dropless and exact"
        return OrtMoE(layer), LayerLowering(name, routing, OP_NAME, "none (dropless kernel)", False, note)
    if reason is not None and not fallback:
        raise LoweringError(f"export(target='ort'): layer {name!r} cannot be lowered to {OP_NAME}: {reason}. "
                            "Use target='portable' (standard ONNX ops express it exactly), or fallback=True to "
                            "lower only this layer portably.")
    note = f"fallback: {reason}" if reason else ""
    k, experts = router.top_k, router.num_experts
    if routing == "expert_choice":
        group = "S = sequence length" if router.group == "sequence" else f"S = {router.group}"
        capacity = f"C = min(ceil({router.capacity_factor}*S*{k}/{experts}), S) per group, {group}"
        return None, LayerLowering(name, routing, "portable", capacity, True, note or "drops as in eager")
    set_by_export = router.capacity_factor is None and capacity_factor is not None
    if set_by_export:
        router.capacity_factor = capacity_factor  # on the copy; the caller's model stays dropless
    factor = router.capacity_factor
    if factor is None:
        return None, LayerLowering(name, routing, "portable", "C = T (dropless)", False, note)
    drops = may_drop(factor, k, experts)
    if drops:
        why = (f"capacity_factor={factor} set by export: may drop tokens that the dropless eager model keeps"
               if set_by_export else "drops as in eager")
        note = "; ".join(filter(None, [note, why]))
    capacity = f"C = min(ceil({factor}*T*{k}/{experts}), T)"
    return None, LayerLowering(name, routing, "portable", capacity, drops, note)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that says nothing about this model (torchvision ops it skips, onnx_ir's
    note on empty attribute lists, torch's own deprecation notices); real problems still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _opset_of(program) -> Optional[int]:
    return next((entry.version for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx")), None)
