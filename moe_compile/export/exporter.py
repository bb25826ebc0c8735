"""moe_compile.export: a converted model -> one ONNX file, each MoE layer lowered for a target.

Targets:
  portable  standard ONNX ops only (no custom domain, no Loop/If): the MoE layer's own forward, exported by the
            dynamo exporter once per distinct layer structure and inlined at each layer (layer_functions.py).
            Router MatMul, Softmax, TopK; the choices sorted by expert (TopK on an int64 key); one Gather of the
            token rows; per expert a Slice with data-dependent bounds and plain MatMuls (Gemm) against that
            expert's 2-D weights (constant slices of the stacked initializers, which ONNX Runtime folds and
            prepacks); the experts' rows concatenated, then gathered back per choice rank and summed (expert
            choice: a ScatterND-add). Exact and dropless unless the model has a capacity; the node count grows
            linearly with the number of experts.
  ort       each MoE layer that com.microsoft.MoE expresses exactly becomes that one node (see ort_moe.py);
            every other layer keeps the portable lowering and the report says why (or, with
            fallback=False, export raises LoweringError). Attention is fused into ONNX Runtime's attention
            ops (fusion.py: GroupQueryAttention where the mask is causal, MultiHeadAttention otherwise).
  tensorrt  each dropless token-choice MoE layer becomes router ops (MatMul, Softmax, TopK, Cast to INT32) feeding
            one `moe_compile::moe_ffn` node, the TensorRT plugin of export/tensorrt.py (see trt_moe.py); the
            rest is standard ONNX, other layers fall back to portable as for `ort`. Also exports bfloat16.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import onnx
import torch
import torch.nn as nn

from ..errors import LoweringError, MoECompileError, first_line
from ..model_io import EXAMPLE_INPUTS_HELP, Inputs, ModelCall, ModelInputs, as_model_inputs, widened
from ..moe import MoELayer, iter_moe_layers
from ..passes.rewrite import replace_submodule
from . import decoder, weight_only
from .fusion import fuse_attention
from .layer_functions import LayerFunctions
from .ort_moe import OrtMoE, may_drop, ort_node_name, ort_unsupported_reason
from .report import ExportReport, LayerLowering
from .trt_moe import OP_NAME as TRT_OP_NAME
from .trt_moe import TensorRTMoE, tensorrt_unsupported_reason

TARGETS = ("portable", "ort", "tensorrt")
DTYPES = (torch.float32, torch.float16)
TRT_DTYPES = DTYPES + (torch.bfloat16,)  # TensorRT builds strongly typed engines in the ONNX file's dtype
# target -> (the node a layer becomes, why a layer cannot, the module that emits the node)
_NODE_LOWERINGS = {"ort": (ort_node_name, ort_unsupported_reason, OrtMoE),
                   "tensorrt": (lambda layer: TRT_OP_NAME, tensorrt_unsupported_reason, TensorRTMoE)}


TASKS = ("forward", "text-generation")


def export(model: nn.Module, example_inputs: Optional[Inputs], path: Union[str, os.PathLike], *,
           task: str = "forward", target: str = "portable", dynamic: bool = True, dtype: Optional[torch.dtype] = None,
           fallback: bool = True, opset: Optional[int] = None, window_cache: bool = False,
           logits: str = "all") -> ExportReport:
    """Write `model` to ONNX, each MoE layer lowered for `target`.

    task="forward": `path` is one ONNX file of the model's forward on inputs like `example_inputs`; every output
    tensor of the model becomes an ONNX output named after its field (logits, last_hidden_state, ...; see
    model_io.named_outputs). example_inputs: a tensor, tuple or dict of tensors, dims 0 and 1 batch and sequence;
    only shapes and dtypes matter, so a batch-1 or sequence-1 example is tiled internally. With dynamic=True the
    batch and sequence axes of every input are dynamic.

    task="text-generation": `path` is a directory; it gets `model.onnx`, a decoder with a KV cache for prefill and
    decode steps (decoder.py: optimum's input and output names, dynamic batch, past and new lengths), config.json,
    the source model's tokenizer and generation files, genai_config.json for onnxruntime-genai, and the metadata
    that `moe_compile.generate` reads. example_inputs is not needed (pass None). window_cache=True: the
    sliding-window layers (Gemma 2/3, Mistral-style) keep only their last W - 1 keys and values in the cache, for
    our runner only (onnxruntime-genai and optimum size every layer's cache alike; no genai_config.json).
    logits="last": the decoder computes the LM head at the last position only (logits [b, 1, vocab]), which is
    all that generating needs; "all" (default) gives every position's, as optimum's exports do, at the cost of an
    LM head per prompt token at prefill (Gemma 3's 262k-token head: 2 GB of logits for a 2048-token prompt).

    The model is deep-copied and put in eval mode (and cast to `dtype`, float32 or float16, or bfloat16 for
    target="tensorrt"); the caller's model is untouched. fallback=False makes target="ort" or "tensorrt" raise
    LoweringError for a layer its node (com.microsoft.MoE, moe_compile::moe_ffn) cannot express instead of
    lowering it portably. opset: the ONNX opset (default: the exporter's).
    """
    if task not in TASKS:
        raise MoECompileError(f"export: unknown task {task!r}. Choose 'forward' (one call of the model's forward) or "
                              "'text-generation' (a decoder with a KV cache, for generating text).")
    if target not in TARGETS:
        raise LoweringError(f"export: unknown target {target!r}. Choose one of {', '.join(TARGETS)} "
                            "('portable' runs on any ONNX runtime; 'ort' uses ONNX Runtime's com.microsoft.MoE; "
                            "'tensorrt' emits moe_compile::moe_ffn plugin nodes for TensorRT).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be a torch.nn.Module, got {type(model).__name__}.")
    if dtype is not None and dtype not in (TRT_DTYPES if target == "tensorrt" else DTYPES):
        also = ", or torch.bfloat16 for target='tensorrt'" if target != "tensorrt" else ", torch.bfloat16"
        raise ValueError(f"export: dtype {dtype} is not supported. Use torch.float32 or torch.float16{also}.")
    if logits not in ("all", "last"):
        raise MoECompileError(f"export: logits={logits!r}; choose 'all' (every position's) or 'last' (the last "
                              "position's, for generating).")
    if task == "text-generation":
        return _export_decoder(model, Path(path), target=target, dtype=dtype, fallback=fallback, opset=opset,
                               window_cache=window_cache, last_logits=logits == "last")
    if window_cache or logits != "all":
        raise MoECompileError("export: window_cache and logits='last' apply to task='text-generation' (a decoder "
                              "with a KV cache); drop them for a forward export, or pass task='text-generation'.")
    inputs = as_model_inputs(example_inputs, "export")
    _check_example(model, inputs)
    _check_writable(path)

    work = copy.deepcopy(model).eval()
    example = widened(inputs) if dynamic else inputs
    try:  # eager, before lowering: the output names, and a clear error when the example does not fit the model
        output_names, layer_inputs = _record_layer_inputs(work, lambda: list(ModelCall(work).named(example)))
    except Exception as error:  # the model's own code raises; say which inputs it was given
        raise MoECompileError(f"export: {type(model).__name__} fails on the example inputs ({inputs.describe(model)}): "
                              f"{first_line(error, 200)} Pass "
                              f"{EXAMPLE_INPUTS_HELP}.") from None
    dynamic_shapes = None
    if dynamic:  # dims 0 and 1 (batch, sequence) of every input
        axes = lambda t: {i: torch.export.Dim.DYNAMIC for i in range(min(t.dim(), 2))}  # noqa: E731
        dynamic_shapes = {"args": tuple(axes(t) for t in example.tensors())}
    return _lower_and_save(ModelCall(work, tuple(example.kwargs)), tuple(example.tensors()), layer_inputs, path,
                           target=target, dynamic=dynamic, dynamic_shapes=dynamic_shapes, dtype=dtype,
                           fallback=fallback, opset=opset, input_names=inputs.names(model), output_names=output_names)


def _export_decoder(model: nn.Module, directory: Path, *, target: str, dtype: Optional[torch.dtype], fallback: bool,
                    opset: Optional[int], window_cache: bool, last_logits: bool) -> ExportReport:
    """task="text-generation": the decoder with a KV cache and the files its clients read, in `directory`."""
    work = copy.deepcopy(model).eval()
    layout = decoder.cache_layout(work, window_cache, last_logits)
    if directory.exists() and not directory.is_dir():
        raise MoECompileError(f"export(task='text-generation'): {os.fspath(directory)!r} is a file; pass a "
                              "directory (it is created when missing).")
    directory.mkdir(parents=True, exist_ok=True)
    args, dynamic_shapes = decoder.example_call(layout)
    call = decoder.DecoderWithPast(work, layout).eval()
    _, layer_inputs = _record_layer_inputs(work, lambda: call(*args))
    report = _lower_and_save(call, args, layer_inputs, directory / decoder.MODEL_FILE, target=target, dynamic=True,
                             dynamic_shapes=dynamic_shapes, dtype=dtype, fallback=fallback, opset=opset,
                             input_names=layout.input_names(), output_names=layout.output_names(),
                             cache_layout=layout)
    report.task = "text-generation"
    report.files = decoder.write_client_files(model, layout, directory, dtype or torch.float32,
                                              shared_cache=report.shared_cache)
    return report


def _record_layer_inputs(work: nn.Module, run):
    """(run(), {MoE layer: the inputs it received during run()}): the portable lowering traces each layer structure
    on what it really receives."""
    layer_inputs: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args: layer_inputs.setdefault(module, []).append(args[0].detach()))
        for _, layer in iter_moe_layers(work)]
    try:
        with torch.no_grad():
            return run(), layer_inputs
    finally:
        for hook in hooks:
            hook.remove()


def _lower_and_save(call: nn.Module, args: tuple, layer_inputs: dict, path, *, target: str, dynamic: bool,
                    dynamic_shapes, dtype: Optional[torch.dtype], fallback: bool, opset: Optional[int],
                    input_names: list[str], output_names: list[str],
                    cache_layout: Optional[decoder.CacheLayout] = None) -> ExportReport:
    """Lower every MoE layer of `call` (a module over the deep copy) for `target`, export call(*args), save; for
    target "ort", fuse attention (fusion.fuse_attention, its masks probed) and, in a decoder with that
    `cache_layout`, let its cache buffers be shared (decoder.share_cache_buffers)."""
    rounded = weight_only.expert_matrices(list(iter_moe_layers(call)))
    if rounded:
        opset = _weight_only_opset(opset, dtype)
    if dtype is not None:
        call = call.to(dtype)
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    dtype_name = str(dtype or next((p.dtype for p in call.parameters() if p.is_floating_point()), torch.float32))
    layers, functions, names, portable = [], LayerFunctions(dynamic), [], set()
    for name, layer in list(iter_moe_layers(call)):
        names.append(name)
        replacement, lowering = _lower(name.removeprefix("model."), layer, target, fallback)
        layers.append(lowering)
        if replacement is None:  # portable: one traced function per layer structure
            portable.add(name)
            replacement = functions.call(layer, [x.to(layer.up_weight.dtype) for x in layer_inputs.get(layer, [])])
        if replacement is not None:
            call = replace_submodule(call, name, replacement)
    with _quiet_exporter():  # keyword inputs travel positionally (see ModelCall)
        try:
            program = torch.onnx.export(call.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=input_names, output_names=output_names, opset_version=opset,
                                        verbose=False)
        except Exception as error:  # the exporter raises many kinds
            raise _export_failure(call, args, names, dynamic_shapes, error) from None
        functions.inline_into(program.model, _opset_of(program))
    rounded = {key: matrix for key, matrix in rounded.items() if matrix.layer in portable}  # the rest: QMoE nodes
    quantized = weight_only.lower_quantized_experts(program.model, rounded) if rounded else 0
    program.save(os.fspath(path))
    fused, shared = _fuse_attention(path, cache_layout) if target == "ort" else (0, [])
    return ExportReport(path=os.fspath(path), target=target, dtype=dtype_name.removeprefix("torch."), layers=layers,
                        opset=_opset_of(program), attention_fused=fused, quantized_matmuls=quantized,
                        shared_cache=shared)


def _export_failure(call: nn.Module, args: tuple, layer_names: list[str], dynamic_shapes,
                    error: Exception) -> LoweringError:
    """The error for a failed ONNX export, saying whether the model exports without its MoE layers (each replaced by
    an identity): if not, its dense model fails the same way and the cause is in the model's own code."""
    cause = _exporter_cause(error)
    for name in layer_names:
        call = replace_submodule(call, name, nn.Identity())
    try:
        torch.onnx.export(call, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    except Exception:  # any failure says the same: the MoE layers are not the cause
        shapes = "with dynamic axes " if dynamic_shapes is not None else ""
        retry = "; try dynamic=False (fixed shapes)" if dynamic_shapes is not None else ""
        return LoweringError(f"export: torch.onnx cannot export this model {shapes}({cause}). Its MoE layers are "
                             "not the cause: with each replaced by an identity the export fails the same way, so the "
                             f"dense model does not export either{retry}.")
    return LoweringError(f"export: torch.onnx failed on the MoE layers of this model ({cause}); the model exports "
                         "without them. Try another target, or report it with the model and config.")


def _exporter_cause(error: Exception) -> str:
    """The line of an exporter error that names what failed (torch.onnx puts it under 'Exception summary')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = next((i for i, line in enumerate(lines) if "Exception summary" in line), None)
    return lines[summary + 1][:300] if summary is not None and summary + 1 < len(lines) else first_line(error, 300)


def _weight_only_opset(opset: Optional[int], dtype: Optional[torch.dtype]) -> int:
    """The opset of an export with b-bit experts: blocked int4 DequantizeLinear needs 21."""
    if dtype not in (None, torch.float32):
        raise MoECompileError(f"export: the experts are b-bit weights (quantize_experts), which export in float32, "
                              f"not {str(dtype).removeprefix('torch.')}; drop dtype=.")
    if opset is not None and opset < weight_only.OPSET:
        raise MoECompileError(f"export: the experts are b-bit weights, written with blocked DequantizeLinear, which "
                              f"needs opset {weight_only.OPSET}; opset={opset} cannot express them. Pass opset=None "
                              f"or {weight_only.OPSET}.")
    return weight_only.OPSET


def _fuse_attention(path, cache_layout: Optional[decoder.CacheLayout]) -> tuple[int, list[str]]:
    """Rewrite the saved file's attention subgraphs into ONNX Runtime's fused attention ops (fusion.py), and a
    decoder's cache for shared buffers where it can; returns (how many were fused, the past inputs shared)."""
    model, fused = fuse_attention(onnx.load(os.fspath(path)))
    shared = decoder.share_cache_buffers(model, cache_layout) if fused and cache_layout is not None else []
    if fused:
        weights = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weights > 1_900_000_000  # a protobuf holds at most 2 GB
        onnx.save(model, os.fspath(path), save_as_external_data=external,
                  location=os.path.basename(os.fspath(path)) + ".data" if external else None)
    return fused, shared


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


def _lower(name: str, layer: MoELayer, target: str, fallback: bool) -> tuple[Optional[nn.Module], LayerLowering]:
    """The module that replaces `layer` in the copy (None: keep it, portable) and its line of the report."""
    router = layer.router
    routing = router.routing
    node_name, unsupported_reason, node_module = _NODE_LOWERINGS.get(target, (None, None, None))
    node = node_name(layer) if node_name else None
    reason = unsupported_reason(layer) if unsupported_reason else None
    if node is not None and reason is None:
        return node_module(layer), LayerLowering(name, routing, node, "none (dropless kernel)", False)
    if reason is not None and not fallback:
        raise LoweringError(f"export(target={target!r}): layer {name!r} cannot be lowered to {node}: {reason}. "
                            "Use target='portable' (standard ONNX ops express it exactly), or fallback=True to "
                            "lower only this layer portably.")
    note = f"fallback: {reason}" if reason else ""
    k, experts, factor = router.top_k, router.num_experts, router.capacity_factor
    if routing == "expert_choice":
        group = "S = sequence length" if router.group == "sequence" else f"S = {router.group}"
        capacity = f"C = min(ceil({factor}*S*{k}/{experts}), S) per group, {group}"
        return None, LayerLowering(name, routing, "portable", capacity, True, note or "drops as in eager")
    if factor is None:
        return None, LayerLowering(name, routing, "portable", "none (dropless)", False, note)
    drops = may_drop(factor, k, experts)
    capacity = f"C = min(ceil({factor}*T*{k}/{experts}), T)"
    return None, LayerLowering(name, routing, "portable", capacity, drops,
                               "; ".join(filter(None, [note, "drops as in eager" if drops else ""])))


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
            warnings.filterwarnings("ignore", "# The axis name", UserWarning)  # one Dim shared by several inputs
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _opset_of(program) -> Optional[int]:
    return program.model.opset_imports.get("")
