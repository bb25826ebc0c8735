"""The embedded example models: nanoGPT-style GPTs defined here, so demos and tests need no download.

`NanoGPT` follows Karpathy's nanoGPT (pre-LayerNorm blocks, causal self-attention, an `MLP` submodule with
Linear -> GELU -> Linear -> Dropout, tied embeddings). `InlineNanoGPT` is the same network with the FFN written
inline in the block's forward (no MLP submodule), the shape many research codebases use. With `gated=True` the
FFN is down(act(gate(x)) * up(x)) (SwiGLU with activation "silu"), of width `ffn_width` (default 4 * n_embd).
`RuntimeMaskGPT` is hand-written GPT code as people write it: the block builds its causal mask from the sequence
length at run time (`torch.ones(t, past + t)`, which torch.fx cannot trace), applies its FFN inline with a functional
activation, `shrink(gelu(expand(h)))`, and takes a KV cache of (keys, values) tensors per block (`past`,
`use_cache`) for generation; `GatedRuntimeMaskGPT` gates it, `shrink(silu(valve(h)) * expand(h))`.

`load_checkpoint` reads the small trained GPTs that examples/train_tiny_gpts.py writes (safetensors, with the
GPTConfig in the file's metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATION_MODULES = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}
_ACTIVATION_FUNCTIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # FFN activation: gelu (erf, nanoGPT's), gelu_tanh (GPT-2's), relu or silu
    ffn_width: Optional[int] = None  # d_ff; None = 4 * n_embd
    gated: bool = False  # down(act(gate(x)) * up(x)) instead of down(act(up(x)))

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATION_MODULES:
            raise ValueError(f"GPTConfig.activation: unknown {self.activation!r}. "
                             f"Choose one of {', '.join(_ACTIVATION_MODULES)}.")
        if self.ffn_width is not None and (not isinstance(self.ffn_width, int) or self.ffn_width < 1):
            raise ValueError(f"GPTConfig.ffn_width: got {self.ffn_width!r}. Use a positive integer, or None for "
                             "4 * n_embd.")

    @property
    def d_ff(self) -> int:
        return self.ffn_width if self.ffn_width is not None else 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, seq, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, config.d_ff, bias=config.bias) if config.gated else None
        self.act = _ACTIVATION_MODULES[config.activation]()
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_gate(x)) * self.c_fc(x) if self.c_gate is not None else self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class InlineBlock(nn.Module):
    """A block whose FFN is sibling layers used inline, with a functional activation."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.fc_in = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.fc_gate = nn.Linear(config.n_embd, config.d_ff, bias=config.bias) if config.gated else None
        self.fc_out = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.ffn_dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        act = _ACTIVATION_FUNCTIONS[self.activation]
        h = act(self.fc_gate(h)) * self.fc_in(h) if self.fc_gate is not None else act(self.fc_in(h))
        return x + self.ffn_dropout(self.fc_out(h))


class RuntimeMaskBlock(nn.Module):
    """Attention with a causal mask built from the sizes at run time, over a KV cache when given one (`past`: keys
    and values [B, heads, P, head_dim]; use_cache=True also returns them with this call's appended); the FFN
    inline, with a functional activation."""

    gated = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=config.bias)
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.expand = nn.Linear(d, 4 * d, bias=config.bias)
        self.valve = nn.Linear(d, 4 * d, bias=config.bias) if self.gated else None
        self.shrink = nn.Linear(4 * d, d, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        self.activation = _ACTIVATION_FUNCTIONS[config.activation]

    def forward(self, x: torch.Tensor, past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                use_cache: bool = False):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in self.qkv(self.ln_1(x)).split(d, -1))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        total = k.shape[2]
        mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(total - t)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.n_head)
        attention = self.drop(scores.masked_fill(~mask, float("-inf")).softmax(-1)) @ v
        x = x + self.c_proj(attention.transpose(1, 2).reshape(b, t, d))
        h = self.ln_2(x)
        h = F.silu(self.valve(h)) * self.expand(h) if self.gated else self.activation(self.expand(h))
        x = x + self.drop(self.shrink(h))
        return (x, (k, v)) if use_cache else x


class GatedRuntimeMaskBlock(RuntimeMaskBlock):
    gated = True


class NanoGPT(nn.Module):
    block_class = Block

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([self.block_class(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("c_proj.weight", "fc_out.weight", "shrink.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> logits [B, S, vocab]."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class InlineNanoGPT(NanoGPT):
    block_class = InlineBlock


class RuntimeMaskGPT(NanoGPT):
    block_class = RuntimeMaskBlock

    def forward(self, idx: torch.Tensor, past: Optional[list] = None, use_cache: bool = False):
        """Token ids [B, S] -> logits [B, S, vocab]; with use_cache=True, (logits, each block's (keys, values)),
        which `past` takes back to continue the sequence at position P (the cached length)."""
        start = 0 if past is None else past[0][0].shape[2]
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        presents = []
        for i, block in enumerate(self.transformer.h):
            x = block(x, past=None if past is None else past[i], use_cache=use_cache)
            if use_cache:
                x, present = x
                presents.append(present)
        logits = self.lm_head(self.transformer.ln_f(x))
        return (logits, presents) if use_cache else logits


class GatedRuntimeMaskGPT(RuntimeMaskGPT):
    block_class = GatedRuntimeMaskBlock


EXAMPLE_MODELS = {"nanogpt": NanoGPT, "nanogpt-inline": InlineNanoGPT, "gpt-runtime-mask": RuntimeMaskGPT,
                  "gpt-runtime-mask-gated": GatedRuntimeMaskGPT}


def build_example(name: str = "nanogpt", seed: int = 0, **config_overrides) -> NanoGPT:
    """An embedded example GPT with seeded random weights; `config_overrides` are GPTConfig fields."""
    if name not in EXAMPLE_MODELS:
        raise ValueError(f"unknown example model {name!r}. Choose one of {', '.join(EXAMPLE_MODELS)}.")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = EXAMPLE_MODELS[name](GPTConfig(**config_overrides))
    model.example_name = name
    return model.eval()


def save_checkpoint(model: NanoGPT, path: Union[str, Path], **metadata: str) -> Path:
    """Write an embedded-example GPT's weights and its GPTConfig (plus string `metadata`) to one safetensors file."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata={"example_name": model.example_name,
                                           "gpt_config": json.dumps(model.config.to_dict()), **metadata})
    return path


def load_checkpoint(path: Union[str, Path]) -> NanoGPT:
    """The embedded-example GPT stored at `path` by save_checkpoint, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist. Train it with examples/train_tiny_gpts.py.")
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
    if "gpt_config" not in metadata:
        raise ValueError(f"load_checkpoint: {path} has no gpt_config metadata, so save_checkpoint did not write it.")
    model = build_example(metadata.get("example_name", "nanogpt"), **json.loads(metadata["gpt_config"]))
    load_model(model, str(path))
    return model.eval()
