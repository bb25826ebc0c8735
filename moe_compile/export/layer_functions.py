"""The portable lowering, traced once per distinct MoE layer instead of once per layer.

torch.export reasons symbolically about every expert's data-dependent slice bounds, and over a whole model that
was most of the export (GPT-2 small split into 8 experts: 66 s, against 12 s for the dense model). Layers of one
structure (module types, settings, tensor names, shapes and dtypes) differ only in their weights, so:

  1. each MoE layer becomes one placeholder node  moe_compile.layers::layer_<i>(x, w_1, ..., w_n)  whose weights
     are the model's initializers, under the layer's own names (`LayerCall`);
  2. one layer of each structure is exported alone, its weights graph inputs, and that graph becomes the ONNX
     function layer_<i>(x, w_1, ..., w_n) -> y;
  3. the functions are inlined, small constant slices folded and constants made initializers again, so the file
     holds the same standard-op graph a whole-model export gives, and the runtime needs no support for functions.
"""

from __future__ import annotations

from typing import Optional

import onnx_ir as ir
import onnxscript.optimizer
import torch
import torch.nn as nn
from torch.func import functional_call

from ..moe import MoELayer

DOMAIN = "moe_compile.layers"
_RUN_STATE = ("training", "routing_stats", "aux_losses")  # what a forward pass sets, not what it computes


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def structure_key(layer: MoELayer, example: torch.Tensor, dynamic: bool = True) -> tuple:
    """Equal for two layers whose exported graphs differ only in their weights' values: every submodule's type and
    settings (repr of each attribute that is not a tensor, module or per-forward state), the tensors' names, shapes
    and dtypes, and the input's dtype and width, or its whole shape when the graph is static (dynamic=False)."""
    settings = tuple(
        (name, type(module).__qualname__,
         tuple((attr, repr(value)) for attr, value in vars(module).items()
               if not attr.startswith("_") and attr not in _RUN_STATE and not isinstance(value, torch.Tensor)))
        for name, module in layer.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in _tensors(layer))
    shape = (example.dim(), example.shape[-1]) if dynamic else tuple(example.shape)
    return settings, tensors, shape, example.dtype


class LayerCall(nn.Module):
    """The placeholder node of one MoE layer; it holds the layer's parameters and buffers under their own names."""

    def __init__(self, layer: MoELayer, op_name: str):
        super().__init__()
        self.op_name = op_name
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, parameter in layer._parameters.items():
            self.register_parameter(name, parameter)
        for name, buffer in layer._buffers.items():
            self.register_buffer(name, buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = tuple(t for _, t in _tensors(self))
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{self.op_name}", (x, *weights), {}, dtype=x.dtype, shape=x.shape,
                                       version=1)


class _WeightsAsInputs(nn.Module):
    """layer(x) with the layer's tensors passed in, so that they become inputs of the exported graph."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer
        self.names = [name for name, _ in _tensors(layer)]

    def forward(self, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return functional_call(self.layer, dict(zip(self.names, weights)), (x,))


class LayerFunctions:
    """The layers lowered as functions: `call` gives each its placeholder, `inline_into` puts the graphs in."""

    def __init__(self, dynamic: bool) -> None:
        self.dynamic = dynamic  # batch and sequence axes dynamic, as in the model's export
        self._functions: dict[tuple, tuple[str, MoELayer, torch.Tensor]] = {}  # key -> (op name, layer, example)

    def call(self, layer: MoELayer, examples: list[torch.Tensor]) -> Optional[LayerCall]:
        """The placeholder of `layer`, given what it receives in the model (each call's input); None when it is
        never called, or called on inputs one function cannot take (then the layer is traced where it stands)."""
        keys = {structure_key(layer, example, self.dynamic) for example in examples}
        if len(keys) != 1:
            return None
        key, = keys
        if key not in self._functions:
            self._functions[key] = (f"layer_{len(self._functions)}", layer, examples[0])
        return LayerCall(layer, self._functions[key][0])

    def inline_into(self, model: ir.Model, opset: Optional[int]) -> None:
        """Export one layer per structure as a function of `model`, then inline every call."""
        if not self._functions:
            return
        for op_name, layer, example in self._functions.values():
            function = _export_function(layer, example, op_name, self.dynamic, opset)
            model.functions[function.identifier()] = function
            for domain, version in function.opset_imports.items():
                model.opset_imports.setdefault(domain, version)
        model.opset_imports[DOMAIN] = 1
        ir.passes.common.InlinePass()(model)
        model.opset_imports.pop(DOMAIN)
        onnxscript.optimizer.fold_constants(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.RemoveUnusedFunctionsPass()(model)
        # the functions' constants back to initializers, deduplicated, as the exporter leaves a whole-model graph
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir.passes.common.DeduplicateInitializersPass()(model)


def _export_function(layer: MoELayer, example: torch.Tensor, op_name: str, dynamic: bool,
                     opset: Optional[int]) -> ir.Function:
    """`layer` exported alone, its weights as inputs, as the function DOMAIN::op_name(x, weights...) -> y."""
    weights = tuple(t for _, t in _tensors(layer))
    axes = {i: torch.export.Dim.DYNAMIC for i in range(example.dim() - 1)} if dynamic else None
    program = torch.onnx.export(_WeightsAsInputs(layer).eval(), (example, *weights), dynamo=True,
                                dynamic_shapes=(axes, tuple(None for _ in weights)) if dynamic else None,
                                input_names=["x", *(f"w{i}" for i in range(len(weights)))], output_names=["y"],
                                opset_version=opset, verbose=False)
    graph = program.model.graph
    for name, value in list(graph.initializers.items()):  # a function has no initializers: constants instead
        if value in graph.inputs:
            continue
        constant = ir.node("Constant", inputs=[], attributes={"value": value.const_value})
        graph.insert_before(graph[0], constant)
        value.replace_all_uses_with(constant.outputs[0])
        graph.initializers.pop(name)
    for node in graph:  # symbolic sizes (u0, s1, ...) would collide between the inlined copies: the runtime infers
        for output in node.outputs:
            output.shape = None
    return ir.Function(DOMAIN, op_name, "", graph=graph, attributes=[])
