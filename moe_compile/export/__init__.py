"""ONNX lowering of converted models (targets `portable`, `ort`, `tensorrt`), TensorRT engines, and the parity check
against eager PyTorch.

onnxruntime and tensorrt are imported only when used, so `import moe_compile` works without them.
"""

from .exporter import TARGETS, export
from .parity import TOLERANCES, OutputParity, ParityReport, check_parity
from .report import ExportReport, LayerLowering
from .tensorrt import TensorRTRunner, build_engine

__all__ = ["ExportReport", "LayerLowering", "OutputParity", "ParityReport", "TARGETS", "TOLERANCES", "TensorRTRunner",
           "build_engine", "check_parity", "export"]
