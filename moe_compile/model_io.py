"""How convert, export and parity call a whole model, and what they read from its output.

Inputs: one tensor, a tuple/list of tensors (positional) or a dict of tensors (keyword: input_ids, attention_mask,
decoder_input_ids, inputs_embeds, ...), held as ModelInputs. Dims 0 and 1 of every input are batch and sequence;
only shapes and dtypes matter to the passes, so `widened` may tile an example to a larger batch and sequence.
A transformers model brings its own example (`default_inputs`: its `dummy_inputs`).

Outputs: a tensor, a ModelOutput, a tuple or a dict of tensors, flattened to named tensors (`named_outputs`): a
ModelOutput's or dict's non-None fields by name, as optimum names ONNX outputs (logits, last_hidden_state, ...),
a tuple's items as output_0, output_1, ...; nested sequences as <name>_0, <name>_1, ...
Transformers models are called with use_cache=False, so that no KV cache enters a graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

Inputs = Union[torch.Tensor, tuple, list, dict]
EXAMPLE_INPUTS_HELP = ("example_inputs: a sample of what the model's forward takes, e.g. (token_ids,) with token_ids "
                       "an integer tensor [batch, seq], or a dict such as {'input_ids': ..., 'attention_mask': ...}; "
                       "only shapes and dtypes matter")


@dataclass
class ModelInputs:
    """model(*args, **kwargs), every value a tensor whose dims 0 and 1 are batch and sequence."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def names(self, model: nn.Module) -> list[str]:
        """Positional inputs take the names of the forward's parameters (input_ids, idx, ...), keywords their key."""
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        positional = [params[i] if i < len(params) else f"input_{i}" for i in range(len(self.args))]
        return positional + list(self.kwargs)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        return ModelInputs(tuple(fn(t) for t in self.args), {k: fn(t) for k, t in self.kwargs.items()})

    def describe(self, model: nn.Module) -> str:
        return ", ".join(f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
                         for name, t in zip(self.names(model), self.tensors()))

    def to_spec(self) -> list[dict[str, Any]]:
        """Shapes and dtypes, for a report or a recipe (keyword inputs carry their name)."""
        spec = [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in self.args]
        return spec + [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                       for k, t in self.kwargs.items()]

    @classmethod
    def from_spec(cls, spec: list[dict[str, Any]]) -> "ModelInputs":
        """Zeros shaped as `to_spec` recorded them."""
        tensors = [(s.get("name"), torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]))) for s in spec]
        return cls(tuple(t for name, t in tensors if name is None), {n: t for n, t in tensors if n is not None})


def as_model_inputs(inputs: Inputs, where: str) -> ModelInputs:
    """A tensor, a sequence of tensors or a dict of tensors (None values dropped) -> ModelInputs."""
    if isinstance(inputs, ModelInputs):
        return inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, dict):
        result = ModelInputs(kwargs={k: v for k, v in inputs.items() if v is not None})
    elif isinstance(inputs, (tuple, list)):
        result = ModelInputs(args=tuple(inputs))
    else:
        result = ModelInputs()
    if not result.tensors() or not all(isinstance(t, torch.Tensor) for t in result.tensors()):
        raise TypeError(f"{where}: inputs must be a tensor, a tuple of tensors or a dict of tensors (e.g. token ids "
                        f"[batch, seq]), got {type(inputs).__name__}.")
    return result


def default_inputs(model: nn.Module) -> Optional[ModelInputs]:
    """The example a transformers model brings (`dummy_inputs`: token ids and, for encoder-decoders, decoder ids,
    the encoder's ids where the model brings none), or None for other models."""
    dummy = getattr(model, "dummy_inputs", None) if hasattr(type(model), "dummy_inputs") else None
    if not isinstance(dummy, dict):
        return None
    tensors = {k: v for k, v in dummy.items() if isinstance(v, torch.Tensor)}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "input_ids" in tensors:  # Pegasus, M2M100: no decoder ids
        tensors.setdefault("decoder_input_ids", tensors["input_ids"])
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):  # dummy ids go up to ~12; a tiny vocabulary may be smaller
        tensors = {k: v % vocab if k.endswith("input_ids") else v for k, v in tensors.items()}
    return ModelInputs(kwargs=tensors) if tensors else None


def widened(inputs: ModelInputs, batch: int = 2, seq: int = 3) -> ModelInputs:
    """The inputs tiled along dims 0 and 1 to at least `batch` x `seq`, batch != seq (torch.export bakes sizes 0 and 1
    into a graph and unifies axes of equal size); the tiles repeat the values, so token ids stay in range."""
    def grow(t: torch.Tensor) -> torch.Tensor:
        sizes = list(t.shape[:2])
        want = [max(sizes[0], batch)] + ([max(sizes[1], seq)] if len(sizes) > 1 else [])
        if len(want) > 1 and want[0] == want[1]:
            want[1] += 1
        if want == sizes or 0 in sizes:
            return t
        reps = [-(-w // s) for w, s in zip(want, sizes)] + [1] * (t.dim() - len(sizes))
        return t.repeat(*reps)[tuple(slice(0, w) for w in want)]
    return inputs.map(grow)


def named_outputs(output: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """The output's tensors by name (see the module docstring); None fields are left out."""
    if isinstance(output, torch.Tensor):  # a bare tensor is an LM's logits (nanoGPT); in a tuple, named by position
        return {"logits" if prefix == "output" else prefix: output}
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = [(f"{prefix}_{i}", value) for i, value in enumerate(output)]
    else:
        raise TypeError(f"the model returned {type(output).__name__}; export and parity need a tensor, a tuple, a "
                        "dict or a ModelOutput of tensors. Wrap the model in a module whose forward returns those.")
    named: dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, torch.Tensor):
            named[name] = value
        elif isinstance(value, (tuple, list, dict)):
            named.update(named_outputs(value, name) if value else {})
    return named


class ModelCall(nn.Module):
    """model(*args, **kwargs) -> its output tensors as a flat tuple, in `named_outputs` order.

    keywords: the last len(keywords) positional inputs are passed by these names (the ONNX exporter takes
    dynamic axes reliably only for positional inputs)."""

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.keywords = keywords
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.keywords:
            split = len(args) - len(self.keywords)
            args, kwargs = args[:split], {**dict(zip(self.keywords, args[split:])), **kwargs}
        return tuple(named_outputs(self.model(*args, **kwargs, **self.extra)).values())

    def named(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """The model's outputs on `inputs` by name, without gradients."""
        with torch.no_grad():
            return named_outputs(self.model(*inputs.args, **inputs.kwargs, **self.extra))
