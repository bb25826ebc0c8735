"""The Triton grouped GEMM against the op's CPU implementation: every activation, plain and gated, fp32 / fp16 / bf16,
skewed routings, shapes that are not multiples of the tiles. On CPU it runs under TRITON_INTERPRET=1 (small shapes:
the interpreter is slow); on a CUDA machine the same tests run the compiled kernel, and also the op's CUDA dispatch."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel needs triton (pip install 'moe-compile[test]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("on CPU the kernel runs under TRITON_INTERPRET=1, which tests/conftest.py sets before triton is "
                "imported", allow_module_level=True)
from moe_compile.kernels import moe_ffn, reference_moe_ffn, triton_moe  # noqa: E402

SMALL = triton_moe.KernelConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)
# max |kernel - reference| / max |reference|; the reference is computed in fp32 from the same rounded operands
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _operands(expert_ids, gated, dtype, d=24, width=20, num_experts=4, seed=0):
    """Random operands; d and width are not multiples of the 16-wide tiles, so the masks are exercised."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).to(dtype)  # noqa: E731
    tokens, k = expert_ids.shape
    rows = 2 * width if gated else width
    return [r(tokens, d), expert_ids, torch.rand(tokens, k, generator=g), r(num_experts, rows, d), r(num_experts, rows),
            r(num_experts, d, width), r(num_experts, d)]


def _check(operands, activation, gated, dtype, config=SMALL):
    on_device = [t.to(DEVICE) for t in operands]
    got = triton_moe.fused_moe(*on_device, activation, gated, config).cpu()
    as_fp32 = [t.float() if t.is_floating_point() else t for t in operands]
    want = reference_moe_ffn(*as_fp32, activation, gated)
    assert got.dtype == dtype and got.shape == want.shape
    error = (got.float() - want).abs().max() / want.abs().max()
    assert error <= TOLERANCE[dtype], f"{activation} gated={gated} {dtype}: relative error {error:.3g}"


def _routing(tokens=10, k=2, num_experts=4, seed=1):
    return torch.randint(0, num_experts, (tokens, k), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_every_activation_fp32(activation, gated):
    _check(_operands(_routing(), gated, torch.float32), activation, gated, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", False)])
def test_half_precision(activation, gated, dtype):
    _check(_operands(_routing(), gated, dtype), activation, gated, dtype)


@pytest.mark.parametrize("expert_ids", [
    torch.full((20, 1), 2),  # every token to one expert: 20 rows, two tiles of that expert
    torch.tensor([[0, 3]] * 7),  # experts 1 and 2 empty
    torch.tensor([[3, 2, 1, 0]] * 3),  # k = E
], ids=["all-to-one", "empty-experts", "k-equals-E"])
def test_skewed_routings(expert_ids):
    _check(_operands(expert_ids, True, torch.float32), "silu", True, torch.float32)


def test_align_to_blocks_pads_each_expert_to_whole_tiles():
    expert_ids = torch.tensor([[2, 0], [2, 2], [0, 2]])  # expert 0: 2 choices, expert 1: none, expert 2: 4
    layout = triton_moe.align_to_blocks(expert_ids, torch.ones(3, 2), 4, block_m=4)
    # expert 0 in tile 0 (2 rows + 2 padding), expert 2 in tile 1; the bound N + E (block_m - 1) = 18 gives 5 tiles
    assert layout.block_expert.tolist() == [0, 2, -1, -1, -1]
    assert layout.choice[:8].tolist() == [1, 4, -1, -1, 0, 2, 3, 5]  # choice c = t k + i, stable
    assert layout.token[:8].tolist() == [0, 2, -1, -1, 0, 1, 1, 2]
    assert (layout.choice[8:] == -1).all() and (layout.weight[layout.choice < 0] == 0).all()


def test_configs_are_fitted_to_shared_memory():
    big = triton_moe.KernelConfig(128, 256, 64, num_warps=8, num_stages=3)
    fitted = triton_moe.fit_shared_memory(big, 4, gated=True, limit=219 * 1024)  # fp32 SwiGLU on an H200
    assert fitted.num_stages * (128 * fitted.block_k + 2 * fitted.block_k * fitted.block_n) * 4 <= 219 * 1024
    assert fitted.block_m == 128 and fitted.num_stages == 2  # stages go first, the row tile never changes
    assert triton_moe.fit_shared_memory(big, 2, gated=False, limit=227 * 1024) == big


@pytest.mark.skipif(DEVICE != "cuda", reason="the op dispatches to the Triton kernel on CUDA tensors only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_op_runs_the_kernel_on_cuda(dtype):
    operands = _operands(_routing(tokens=300, num_experts=8), True, dtype, d=256, width=512, num_experts=8)
    got = moe_ffn(*[t.cuda() for t in operands], "silu", True).cpu()
    want = reference_moe_ffn(*[t.float() if t.is_floating_point() else t for t in operands], "silu", True)
    assert (got.float() - want).abs().max() / want.abs().max() <= TOLERANCE[dtype]
