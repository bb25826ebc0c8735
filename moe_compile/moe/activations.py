"""The elementwise activations an FFN may use, by canonical name.

gelu       x * Phi(x)                                  (erf form, torch's default)
gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's "gelu_new")
relu       max(x, 0)
relu2      max(x, 0)^2                                 (squared ReLU: Primer, Nemotron, Arcee, BitNet)
silu       x * sigmoid(x)                              (SwiGLU's gate activation)

An activation is one of these names, or the model's own elementwise module with learned scalar parameters
(y_i = f(x_i; theta), Apertus' xIELU), kept as it is: it computes on any subset of the neurons as on all of them.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}

Activation = Union[str, nn.Module]  # a name of ACTIVATIONS, or an elementwise module with learned parameters


def activation_function(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[activation] if isinstance(activation, str) else activation


def activation_name(activation: Activation) -> str:
    return activation if isinstance(activation, str) else f"{type(activation).__name__} (learned)"


def is_elementwise(module: nn.Module) -> bool:
    """Whether `module` computes y_i = f(x_i), the same f at every position and for any width: each element of a
    probe computed alone (a width of 1) gives what it gives among the others. A norm over the last axis, or
    parameters per channel, fail it."""
    param = next(iter([*module.parameters(), *module.buffers()]), None)
    like = dict(dtype=torch.float32) if param is None else dict(dtype=param.dtype, device=param.device)
    probe = (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)) * 3).to(**like)
    try:
        with torch.no_grad():
            whole, alone = module(probe), module(probe.reshape(-1, 1))
    except Exception:
        return False
    return (isinstance(whole, torch.Tensor) and isinstance(alone, torch.Tensor) and whole.shape == probe.shape
            and alone.numel() == probe.numel() and torch.allclose(alone.reshape(probe.shape), whole, rtol=1e-6,
                                                                  atol=1e-6))


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> Optional[str]:
    """Name the activation that `fn` computes, by evaluating it, or None.

    Modules are recognised by what they compute rather than by their class, so `nn.GELU`, transformers'
    `NewGELUActivation` or a user's own module that computes GELU are all found.
    """
    probe = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)
    try:
        with torch.no_grad():
            out = fn(probe.clone())
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(out.double(), ref(probe), rtol=0, atol=1e-6):
            return name
    return None
