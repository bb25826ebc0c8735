"""TensorRT deployment of a `tensorrt`-target ONNX file: the moe_ffn plugin, the engine builder and a runner.

    ONNX file ──parse (moe_ffn nodes -> our plugin)──► strongly typed network ──build (token profile)──► engine
    engine + inputs ──execute_async_v3──► logits, compared with eager PyTorch by check_parity (FILE.engine)

The plugin is a TensorRT quickly deployable plugin (`tensorrt.plugin`, TensorRT >= 10.8), id moe_compile::moe_ffn,
version 1, registered by `register_plugin()` with the node's attributes activation (str) and gated (int: an ONNX
INT attribute, which the parser hands over as an integer field), and:
  register   output = the hidden input's shape and dtype (plugin_output_shape);
  autotune   io types FP32|FP16|BF16 for the float operands, INT32 for the expert ids (PLUGIN_IO_TYPES),
             one tactic per kernel tile shape of kernels.triton_moe.CONFIGS (tactic 0: pick_config's choice);
  impl       the Triton kernel (kernels.triton_moe.fused_moe) on TensorRT's stream (JIT: the process that runs
             the engine imports this module). No aot_impl: an AOT plugin is one kernel launch with int32 scalar
             arguments and no workspace, and moe_ffn is a sort, two grouped GEMMs and a per-token sum.
Precision comes from the ONNX file (strong typing): export with dtype=torch.float16 or torch.bfloat16.

TensorRT is not installable on the machines this was written on: everything here that needs `import tensorrt` is
written against the documented API (TensorRT 10.x / 11) and untested; the plain functions below are tested.
"""

# no `from __future__ import annotations`: tensorrt.plugin reads the plugin functions' annotations as types
import os
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch

from ..kernels.moe_ffn import operand_problem
from .trt_moe import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
ENGINE_SUFFIXES = (".engine", ".plan")
FLOAT_TYPES = "FP32|FP16|BF16"
# x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias -> y: one dependent float choice for all
PLUGIN_IO_TYPES = ", ".join([FLOAT_TYPES, "INT32"] + [FLOAT_TYPES] * 6)


def plugin_output_shape(x_shape: Sequence[int]) -> tuple[int, ...]:
    """The plugin's output shape: y has x's shape [T, d] (and dtype)."""
    if len(x_shape) != 2:
        raise ValueError(f"moe_ffn plugin: hidden input must be [T, d], got rank {len(x_shape)}")
    return tuple(x_shape)


def plugin_tactics() -> list[int]:
    """Autotune tactics: i >= 1 runs CONFIGS[i - 1] (TensorRT wants positive tactic ids)."""
    from ..kernels.triton_moe import CONFIGS

    return list(range(1, len(CONFIGS) + 1))


def config_for_tactic(tactic: int, num_choices: int, num_experts: int):
    """The kernel tiles of a tactic; tactic 0 (TensorRT did not autotune) takes pick_config's heuristic."""
    from ..kernels.triton_moe import CONFIGS, pick_config

    if 1 <= tactic <= len(CONFIGS):
        return CONFIGS[tactic - 1]
    return pick_config(num_choices, num_experts)


def profile_shapes(shape: Sequence[int], opt: Sequence[int], max_: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of one network input whose dynamic dims (-1) are the leading batch / sequence axes:
    each dynamic dim i ranges over 1 .. max_[i], tuned for opt[i]; static dims stay."""
    dims = []
    for i, size in enumerate(shape):
        if size >= 0:
            dims.append((size, size, size))
            continue
        if i >= len(opt):
            raise ValueError(f"input shape {tuple(shape)}: dynamic dim {i} beyond the profile's {len(opt)} axes")
        if not 1 <= opt[i] <= max_[i]:
            raise ValueError(f"profile: need 1 <= opt <= max for dim {i}, got opt {opt[i]}, max {max_[i]}")
        dims.append((1, opt[i], max_[i]))
    return tuple(tuple(d[j] for d in dims) for j in range(3))


def import_tensorrt():
    """`tensorrt`, or an ImportError that says how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise ImportError("TensorRT is not installed. Install it from NVIDIA's package index "
                          "(pip install 'moe-compile[trt]' with --extra-index-url https://pypi.nvidia.com) on a "
                          "machine with an NVIDIA GPU, or deploy the 'ort' / 'portable' targets instead.") from error
    return tensorrt


_registered = False


def register_plugin() -> None:
    """Register moe_compile::moe_ffn with TensorRT's plugin registry (once per process). Needs TensorRT and
    Triton; the parser finds the plugin by the nodes' op_type, plugin_namespace and plugin_version."""
    global _registered
    if _registered:
        return
    trt = import_tensorrt()
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _moe_ffn_desc(x: trtp.TensorDesc, expert_ids: trtp.TensorDesc, gates: trtp.TensorDesc,
                      fc1_weight: trtp.TensorDesc, fc1_bias: trtp.TensorDesc, fc2_weight: trtp.TensorDesc,
                      fc2_bias: trtp.TensorDesc, activation: str, gated: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def _moe_ffn_autotune(x: trtp.TensorDesc, expert_ids: trtp.TensorDesc, gates: trtp.TensorDesc,
                          fc1_weight: trtp.TensorDesc, fc1_bias: trtp.TensorDesc, fc2_weight: trtp.TensorDesc,
                          fc2_bias: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(PLUGIN_IO_TYPES, "LINEAR", plugin_tactics())]

    @trtp.impl(PLUGIN_ID)
    def _moe_ffn_impl(x: trtp.Tensor, expert_ids: trtp.Tensor, gates: trtp.Tensor, fc1_weight: trtp.Tensor,
                      fc1_bias: trtp.Tensor, fc2_weight: trtp.Tensor, fc2_bias: trtp.Tensor, activation: str,
                      gated: int, outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        from ..kernels.triton_moe import fused_moe

        operands = [_as_torch(t, trt) for t in (x, expert_ids, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
        problem = operand_problem(*operands, activation, bool(gated))
        if problem:
            raise ValueError(f"moe_ffn plugin: {problem}")
        tokens, k = operands[1].shape
        config = config_for_tactic(tactic, tokens * k, operands[3].shape[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _as_torch(outputs[0], trt).copy_(fused_moe(*operands, activation, bool(gated), config))

    _registered = True


class _CudaArray:
    """A device pointer as __cuda_array_interface__ (TensorRT's own raises for BF16: expose it as int16)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (pointer, False), "version": 3}


def _torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}


_TYPESTRS = {torch.float32: ("<f4", None), torch.float16: ("<f2", None), torch.bfloat16: ("<i2", torch.bfloat16),
             torch.int32: ("<i4", None), torch.int64: ("<i8", None), torch.bool: ("|b1", None)}


def _as_torch(tensor, trt) -> torch.Tensor:
    """A zero-copy torch view of a contiguous trtp.Tensor."""
    dtype = _torch_dtypes(trt)[tensor.dtype]
    typestr, view = _TYPESTRS[dtype]
    shape = tuple(int(s) for s in tensor.shape)
    pointer = tensor.data_ptr() if callable(tensor.data_ptr) else tensor.data_ptr  # a property in the docs
    out = torch.as_tensor(_CudaArray(int(pointer), shape, typestr), device="cuda")
    return out.view(view) if view is not None else out


def build_engine(onnx_path: Union[str, os.PathLike], engine_path: Union[str, os.PathLike], *,
                 opt_shape: Sequence[int] = (1, 512), max_shape: Sequence[int] = (8, 4096),
                 workspace_bytes: int = 4 << 30) -> Path:
    """Build a TensorRT engine from a `tensorrt`-target ONNX file and write it to engine_path.

    Strongly typed: the engine computes in the ONNX file's dtypes. One optimization profile: every dynamic input
    axis i (batch, sequence) ranges over 1 .. max_shape[i] and is tuned for opt_shape[i]."""
    trt = import_tensorrt()
    register_plugin()
    if trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise RuntimeError(f"build_engine: TensorRT's registry has no {PLUGIN_ID} plugin after registering it.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"build_engine: TensorRT could not parse {os.fspath(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_shapes(tuple(tensor.shape), opt_shape, max_shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"build_engine: TensorRT failed to build an engine from {os.fspath(onnx_path)} "
                           "(its log above says why).")
    path = Path(engine_path)
    path.write_bytes(bytes(plan))
    return path


class TensorRTRunner:
    """Runs a serialized engine on CUDA torch tensors: runner(*inputs) -> {output name: tensor}."""

    def __init__(self, engine_path: Union[str, os.PathLike]):
        trt = import_tensorrt()
        register_plugin()  # a JIT plugin calls back into this process
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRTRunner: {os.fspath(engine_path)} is not an engine this TensorRT can load.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"TensorRTRunner: the engine takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), "
                             f"got {len(inputs)}.")
        dtypes = _torch_dtypes(self._trt)
        keep = []
        for name, tensor in zip(self.inputs, inputs):
            tensor = tensor.to("cuda", dtypes[self.engine.get_tensor_dtype(name)]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRTRunner: execute_async_v3 failed (TensorRT's log says why).")
        stream.synchronize()
        return results


def is_engine(path: Union[str, os.PathLike]) -> bool:
    return Path(path).suffix in ENGINE_SUFFIXES


def run_engine(engine_path: Union[str, os.PathLike], inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: value} of every engine output on `inputs`: what check_parity compares for an engine file."""
    return TensorRTRunner(engine_path)(*inputs)

