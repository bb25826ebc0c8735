"""ONNX lowering of converted models (targets `portable`, `ort`, `tensorrt`), TensorRT engines, and the parity check
against eager PyTorch.

onnxruntime and tensorrt are imported only when used, so `import moe_compile` works without them.
"""

from .exporter import TARGETS, TASKS, export
from .generate import GenerationResult, Generator, generate
from .parity import TOLERANCES, GenerationParity, OutputParity, ParityReport, check_generation, check_parity
from .report import ExportReport, LayerLowering
from .tensorrt import TensorRTRunner, build_engine

__all__ = ["ExportReport", "GenerationParity", "GenerationResult", "Generator", "LayerLowering", "OutputParity",
           "ParityReport", "TARGETS", "TASKS", "TOLERANCES", "TensorRTRunner", "build_engine", "check_generation",
           "check_parity", "export", "generate"]
