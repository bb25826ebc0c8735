"""moe_compile: rewrite the dense FFN blocks of GPT-style PyTorch models into sparse Mixture-of-Experts,
lower them to ONNX Runtime and TensorRT, and prove parity with eager PyTorch."""

from .config import MoEConfig
from .errors import LoweringError, MoECompileError, NoFFNFoundError, RecipeError
from .moe import MoELayer, RoutingStats, aux_loss, routing_stats
from .passes import ConversionReport, SiteReport, convert, find_ffn_blocks

__version__ = "0.1.0"

__all__ = ["ConversionReport", "LoweringError", "MoECompileError", "MoEConfig", "MoELayer", "NoFFNFoundError",
           "RecipeError", "RoutingStats", "SiteReport", "aux_loss", "convert", "find_ffn_blocks",
           "routing_stats"]
