"""Grouped-GEMM MoE kernels behind one torch.library custom op, `moe_compile::moe_ffn` (see moe_ffn.py).

The Triton kernel (triton_moe.py) is imported only when the op runs on CUDA, so this package imports without Triton.
"""

from .moe_ffn import HAS_TRITON, OP_NAME, layer_operands, moe_ffn, operand_problem, reference_moe_ffn

__all__ = ["HAS_TRITON", "OP_NAME", "layer_operands", "moe_ffn", "operand_problem", "reference_moe_ffn"]
