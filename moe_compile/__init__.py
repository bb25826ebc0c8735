"""moe_compile: rewrite the dense FFN blocks of GPT-style PyTorch models into sparse Mixture-of-Experts,
lower them to ONNX Runtime and TensorRT, and prove parity with eager PyTorch."""

from .config import MoEConfig
from .errors import HFCheckpointError, LoweringError, MoECompileError, NoFFNFoundError, RecipeError
from .export import ExportReport, Generator, ParityReport, check_generation, check_parity, export, generate
from .heal import HealingError, HealReport, heal
from .hf_checkpoint import HFCheckpoint, convert_hf_checkpoint, save_hf
from .moe import MoELayer, RoutingStats, aux_loss, routing_stats
from .moe.quantize import quantize_experts
from .optimize import OptimizeReport, optimize
from .passes import ConversionReport, SiteReport, convert, find_ffn_blocks
from .serialization import load, save
from .stats import ModelStats, SiteStats, model_stats

__version__ = "0.1.0"

__all__ = ["ConversionReport", "ExportReport", "Generator", "HFCheckpoint", "HFCheckpointError", "HealReport",
           "HealingError", "LoweringError", "MoECompileError", "MoEConfig", "MoELayer", "ModelStats",
           "NoFFNFoundError", "OptimizeReport", "ParityReport", "RecipeError", "RoutingStats", "SiteReport",
           "SiteStats", "aux_loss", "check_generation", "check_parity", "convert", "convert_hf_checkpoint", "export",
           "find_ffn_blocks", "generate", "heal", "load", "model_stats", "optimize", "quantize_experts",
           "routing_stats", "save", "save_hf"]
