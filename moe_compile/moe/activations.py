"""The elementwise activations an FFN may use, by canonical name.

gelu       x * Phi(x)                                  (erf form, torch's default)
gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's "gelu_new")
relu       max(x, 0)
relu2      max(x, 0)^2                                 (squared ReLU: Primer, Nemotron, Arcee, BitNet)
silu       x * sigmoid(x)                              (SwiGLU's gate activation)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


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
