"""moe_compile: rewrite the dense FFN blocks of GPT-style PyTorch models into sparse Mixture-of-Experts,
lower them to ONNX Runtime and TensorRT, and prove parity with eager PyTorch."""

from .config import MoEConfig
from .errors import LoweringError, MoECompileError, NoFFNFoundError, RecipeError
from .export import ExportReport, ParityReport, check_parity, export
from .moe import MoELayer, RoutingStats, aux_loss, routing_stats
from .passes import ConversionReport, SiteReport, convert, find_ffn_blocks
from .serialization import load, save
from .stats import ModelStats, SiteStats, model_stats

__version__ = "0.1.0"

__all__ = ["ConversionReport", "ExportReport", "LoweringError", "MoECompileError", "MoEConfig", "MoELayer",
           "ModelStats", "NoFFNFoundError", "ParityReport", "RecipeError", "RoutingStats", "SiteReport",
           "SiteStats", "aux_loss", "check_parity", "convert", "export", "find_ffn_blocks", "load", "model_stats",
           "routing_stats", "save"]
