"""Fused MoE FFN on Triton: a grouped GEMM over choices sorted by expert (the scheme of vLLM's fused MoE).

The N = T k routing choices are sorted by expert (dispatch.sort_by_expert) and each expert's segment is padded to a
multiple of BLOCK_M, so that every BLOCK_M-row tile of the sorted rows belongs to one expert (`block_expert`).
Padding rows carry token -1 and are neither read nor written. Two launches of one GEMM kernel, then a sum:

    fc1   h_r = act(x_{t_r} W1[e_r]^T + b1[e_r])                       (plain)
          h_r = act(x W1g^T + b1g) * (x W1u^T + b1u),  W1 = [W1g; W1u]   (gated: SwiGLU when act = silu)
    fc2   o_{c_r} = w_r (h_r W2[e_r]^T + b2[e_r])                      (gate weight applied, one row per choice c)
    y_t   = sum_i o_{t k + i}                                          (combined per token, no atomics)

Weights are stacked nn.Linear weights [E, out, in]. Products accumulate in fp32 (fp16 / bf16 / fp32 inputs), the
bias, activation and gate weight apply to the fp32 accumulator, and h and o are stored in the input dtype.
Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how CI checks it; set it before this module is imported).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of the grouped GEMM (one entry of CONFIGS is one autotune tactic)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# BLOCK_M sets the per-expert padding, so it is picked from the rows per expert before the sort (see pick_config);
# the rest are the tactics that autotuning (Triton's here, TensorRT's in the plugin) chooses from.
CONFIGS = (
    KernelConfig(16, 64, 64, num_warps=4, num_stages=4),
    KernelConfig(32, 64, 64, num_warps=4, num_stages=4),
    KernelConfig(64, 128, 64, num_warps=4, num_stages=3),
    KernelConfig(64, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
)


def pick_config(num_choices: int, num_experts: int) -> KernelConfig:
    """A tile shape for the mean rows per expert: small tiles when experts see few rows (less padding, more
    tiles in flight), 128x128 when the GEMMs are large."""
    rows = num_choices / max(num_experts, 1)
    if rows <= 16:
        return CONFIGS[0]
    if rows <= 64:
        return CONFIGS[1]
    if rows <= 512:
        return CONFIGS[2]
    return CONFIGS[4]


def fit_shared_memory(config: KernelConfig, element_size: int, gated: bool, limit: int) -> KernelConfig:
    """`config` with fewer pipeline stages, then narrower tiles, until its operand buffers,
    num_stages (BLOCK_M BLOCK_K + (2 if gated) BLOCK_K BLOCK_N) element_size bytes, fit in `limit` bytes."""
    def size(c: KernelConfig) -> int:
        return c.num_stages * (c.block_m * c.block_k + (2 if gated else 1) * c.block_k * c.block_n) * element_size

    while size(config) > limit:
        if config.num_stages > 2:
            config = replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > 32:
            config = replace(config, block_n=config.block_n // 2)
        elif config.block_k > 16:
            config = replace(config, block_k=config.block_k // 2)
        else:
            break
    return config


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory a kernel may use on `device` (less a margin for Triton's own buffers)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    properties = torch.cuda.get_device_properties(device)
    limit = getattr(properties, "shared_memory_per_block_optin", 0) or 99 * 1024
    return limit - 8 * 1024


@triton.jit
def _activation(v, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:  # gelu (erf)
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACTIVATION == 1:  # gelu (tanh): 0.5 v (1 + tanh(z)) = v sigmoid(2 z)
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = v * tl.sigmoid(2.0 * z)
    elif ACTIVATION == 2:  # relu
        v = tl.maximum(v, 0.0)
    else:  # silu
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def moe_gemm_kernel(
    a_ptr, a_rows_ptr, w_ptr, bias_ptr, out_ptr, out_rows_ptr, row_weight_ptr, block_expert_ptr,
    num_rows, N, K: tl.constexpr,
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    ACTIVATION: tl.constexpr, APPLY_ACTIVATION: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[out_rows[r]] = epilogue(a[a_rows[r]] W[e]^T + b[e]) for the rows r of one BLOCK_M tile, e its expert.

    IEEE: fp32 products in full fp32 (not TF32); UPCAST: fp16 / bf16 tiles multiplied in fp32 (the interpreter only).
    Rows with a_rows = -1 (padding) read zeros; rows with out_rows = -1 are not written. With GATED the tile
    also multiplies by rows N .. 2N of W[e] (the up projection) and computes act(gate) * up."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles sweep the N tiles together, so their weight tiles stay in L2
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_size
    pid_n = (pid % pids_in_group) // group_size

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # a tile past the last expert's padded segment
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    a_rows = tl.load(a_rows_ptr + offs_m)
    row_valid = a_rows >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        up_ptrs = w_ptrs + N * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if GATED:
            u = tl.load(up_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
            if GATED:
                u = u.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
            if GATED:
                acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
            if GATED:
                acc_up = tl.dot(a, u, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
        if GATED:
            up_ptrs += BLOCK_K * stride_wk

    bias_base = bias_ptr + expert.to(tl.int64) * stride_be
    acc += tl.load(bias_base + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if APPLY_ACTIVATION:
        acc = _activation(acc, ACTIVATION)
    if GATED:
        acc_up += tl.load(bias_base + N + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        acc = acc * acc_up
    if WEIGHTED:
        acc = acc * tl.load(row_weight_ptr + offs_m, mask=row_valid, other=0.0).to(tl.float32)[:, None]

    out_rows = tl.load(out_rows_ptr + offs_m)
    out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(out_rows >= 0)[:, None] & n_valid[None, :])


@dataclass
class PaddedLayout:
    """The sorted choices with each expert's segment padded to a multiple of block_m (P rows, an upper bound that
    needs no host sync: N + E (block_m - 1), rounded up to a whole tile)."""

    token: torch.Tensor  # [P] int32, token of each row, -1 for padding
    choice: torch.Tensor  # [P] int32, choice t k + i of each row, -1 for padding
    weight: torch.Tensor  # [P] fp32 gate of each row, 0 for padding
    block_expert: torch.Tensor  # [P / block_m] int32, expert of each tile, -1 past the last segment


def align_to_blocks(expert_ids: torch.Tensor, gates: torch.Tensor, num_experts: int, block_m: int) -> PaddedLayout:
    """Sort the [T, k] choices by expert (stable, as sort_by_expert) and pad every expert's segment to block_m rows."""
    tokens, k = expert_ids.shape
    device = expert_ids.device
    flat = expert_ids.reshape(-1).long()  # choice c = t k + i
    n = flat.shape[0]
    order = (flat * n + torch.arange(n, device=device)).sort().indices  # stable sort by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_starts = padded.cumsum(0) - padded
    starts = counts.cumsum(0) - counts
    sorted_expert = flat[order]
    position = padded_starts[sorted_expert] + torch.arange(n, device=device) - starts[sorted_expert]

    num_blocks = triton.cdiv(n + num_experts * (block_m - 1), block_m)
    rows = num_blocks * block_m
    choice = torch.full((rows,), -1, dtype=torch.int32, device=device).scatter(0, position, order.int())
    token = torch.where(choice >= 0, choice.div(k, rounding_mode="floor"), choice)
    weight = torch.zeros(rows, dtype=torch.float32, device=device)
    weight = weight.scatter(0, position, gates.reshape(-1).float()[order])
    # tile b belongs to expert e iff padded_starts[e] <= b block_m < padded_starts[e] + padded[e]
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded.cumsum(0), block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).int()
    return PaddedLayout(token=token, choice=choice, weight=weight, block_expert=block_expert)


def _gemm(a: torch.Tensor, a_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
          out_rows: torch.Tensor, layout: PaddedLayout, n: int, config: KernelConfig, *, activation: int,
          apply_activation: bool, gated: bool, weighted: bool) -> None:
    rows = layout.token.shape[0]
    # the interpreter's tl.dot reads bf16 tiles as garbage (Triton 3.6 and numpy 2.4): there, multiply in fp32
    upcast = a.dtype == torch.bfloat16 and triton.knobs.runtime.interpret
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(n, config.block_n),)
    moe_gemm_kernel[grid](
        a, a_rows, weight, bias, out, out_rows, layout.weight, layout.block_expert,
        rows, n, a.shape[1],
        a.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), bias.stride(0), out.stride(0),
        ACTIVATION=activation, APPLY_ACTIVATION=apply_activation, GATED=gated, WEIGHTED=weighted,
        IEEE=a.dtype == torch.float32 or upcast, UPCAST=upcast,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, fc1_weight: torch.Tensor,
              fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, activation: str, gated: bool,
              config: Optional[KernelConfig] = None) -> torch.Tensor:
    """y [T, d] of the module docstring; operands as moe_compile::moe_ffn takes them (already validated)."""
    tokens, k = expert_ids.shape
    num_experts, fc1_rows, _ = fc1_weight.shape
    width = fc1_rows // 2 if gated else fc1_rows
    d_out = fc2_weight.shape[1]
    config = fit_shared_memory(config or pick_config(tokens * k, num_experts), x.element_size(), gated,
                               shared_memory_limit(x.device))
    x = x.contiguous()
    fc1_weight, fc2_weight = fc1_weight.contiguous(), fc2_weight.contiguous()
    fc1_bias, fc2_bias = fc1_bias.contiguous(), fc2_bias.contiguous()
    layout = align_to_blocks(expert_ids, gates, num_experts, config.block_m)
    rows = layout.token.shape[0]
    every_row = torch.arange(rows, dtype=torch.int32, device=x.device)

    hidden = x.new_empty(rows, width)
    _gemm(x, layout.token, fc1_weight, fc1_bias, hidden, every_row, layout, width, config,
          activation=ACTIVATION_CODES[activation], apply_activation=True, gated=gated, weighted=False)
    per_choice = x.new_empty(tokens * k, d_out)
    own_row = torch.where(layout.token >= 0, every_row, -1)
    _gemm(hidden, own_row, fc2_weight, fc2_bias, per_choice, layout.choice, layout, d_out, config,
          activation=0, apply_activation=False, gated=False, weighted=True)
    return per_choice.view(tokens, k, d_out).sum(1, dtype=torch.float32).to(x.dtype)
