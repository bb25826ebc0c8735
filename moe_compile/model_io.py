"""How export, parity and the torch.export search call a whole model: token ids in, one logits tensor out.

nanoGPT-style models return the logits tensor; Hugging Face models return a ModelOutput whose `.logits` is
taken, and are called with use_cache=False so that no KV cache enters the graph.
"""

from __future__ import annotations

import inspect
from typing import Any, Union

import torch
import torch.nn as nn

Inputs = Union[torch.Tensor, tuple, list]


def as_input_tuple(inputs: Inputs, where: str) -> tuple[torch.Tensor, ...]:
    """One tensor or a sequence of tensors -> a tuple of tensors."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else None
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{where}: inputs must be a tensor or a tuple of tensors (e.g. token ids [batch, seq]), "
                        f"got {type(inputs).__name__}.")
    return items


def logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}; export and parity need a tensor or an output with "
                    "a `.logits` tensor. Wrap the model in a module whose forward returns the tensor to export.")


class LogitsModel(nn.Module):
    """model(*inputs) -> its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(*inputs, **self.kwargs))
