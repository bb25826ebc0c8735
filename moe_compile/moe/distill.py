"""Short distillation of one MoE layer to the dense FFN it replaces.

    minimise  || MoE(x) - FFN(x) ||^2   over the experts, the shared expert and the biases (router fixed)

on sampled inputs x of the layer in the converted model (so the errors of earlier layers are in them), with
Adam on seeded minibatches. The last `held_out` share of the tokens is never trained on: every `eval_every`
steps the held-out error is measured and the best weights seen are kept, so the fit cannot end worse than it
started. Reported: relative held-out error ||MoE - FFN||^2 / ||FFN - mean||^2 before and after, and seconds.
"""

from __future__ import annotations

import time

import torch

from .ffn import DenseFFN
from .layer import MoELayer

DISTILL_LR = 1e-3
DISTILL_BATCH = 512


@torch.enable_grad()
def distill_layer(layer: MoELayer, ffn: DenseFFN, inputs: torch.Tensor, steps: int, seed: int,
                  held_out: float = 0.2, eval_every: int = 25) -> dict[str, float]:
    start = time.perf_counter()
    like = layer.up_weight
    x = inputs.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        target = ffn(x)
    fit = max(int(len(x) * (1 - held_out)), 1)
    scale = float((target[fit:] - target[fit:].mean(0)).pow(2).sum()) or 1.0
    params = [p for name, p in layer.named_parameters() if not name.startswith("router.")]
    optimizer = torch.optim.Adam(params, lr=DISTILL_LR)
    generator = torch.Generator().manual_seed(seed)
    was_training = layer.training
    layer.eval()

    def held_out_error() -> float:
        with torch.no_grad():
            return float((layer(x[fit:]) - target[fit:]).pow(2).sum()) / scale

    before = best = held_out_error()
    best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    for step in range(1, steps + 1):
        rows = torch.randint(0, fit, (min(DISTILL_BATCH, fit),), generator=generator).to(x.device)
        loss = (layer(x[rows]) - target[rows]).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            error = held_out_error()
            if error < best:
                best, best_state = error, {k: v.detach().clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(best_state)
    layer.train(was_training)
    return {"error_before": before, "error_after": best, "seconds": time.perf_counter() - start}
