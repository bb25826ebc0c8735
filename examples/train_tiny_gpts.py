"""Train the small byte-level GPTs that the split-expert evaluation and tests use, with no download.

    python examples/train_tiny_gpts.py                 # all three, a few minutes each on 2 CPU cores
    python examples/train_tiny_gpts.py --only relu --steps 200

Each is the embedded nanoGPT (4 layers, d_model 128, 4 heads, FFN width 512, context 128 bytes) trained on the
Python standard library's own source (moe_compile.example_text: fixed file list, split by file) with AdamW,
linear warm-up then cosine decay, seeded: 500 steps of 16 windows of 128 bytes, one thread (the committed
checkpoints were trained so, the three side by side on a shared 2-core machine, 5-10 minutes each).
Variants: ReLU, GELU (erf) and SwiGLU (silu-gated) FFNs. The checkpoints go to
examples/checkpoints/tiny_gpt_<variant>.safetensors with their GPTConfig and the validation perplexity in the
metadata.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_compile.example_models import build_example, save_checkpoint
from moe_compile.example_text import perplexity, stdlib_bytes, windows

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
VARIANTS = {
    "relu": dict(activation="relu"),
    "gelu": dict(activation="gelu"),
    "swiglu": dict(activation="silu", gated=True),
}
SHAPE = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128, ffn_width=512, dropout=0.0)


def train(variant: str, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_example("nanogpt", seed=seed, **SHAPE, **VARIANTS[variant]).train()
    data, validation = stdlib_bytes("train"), stdlib_bytes("validation")
    batches = windows(data, SHAPE["block_size"], steps * batch_size, seed).view(steps, batch_size, -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(steps // 20, 1)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        progress = (step - warmup) / (steps - warmup)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * scale)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{variant} step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    ppl = perplexity(model, validation)
    print(f"{variant}: validation perplexity {ppl:.3f} after {steps} steps, {seconds:.0f} s")
    return save_checkpoint(model, CHECKPOINTS / f"tiny_gpt_{variant}.safetensors", variant=variant,
                           steps=str(steps), batch_size=str(batch_size), seed=str(seed),
                           validation_perplexity=f"{ppl:.4f}", train_seconds=f"{seconds:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append", help="train only these variants")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.only or VARIANTS:
        print(train(variant, args.steps, args.batch_size, args.lr, args.seed))


if __name__ == "__main__":
    main()
