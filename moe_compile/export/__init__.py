"""ONNX lowering of converted models (targets `portable` and `ort`) and the parity check against eager PyTorch.

onnxruntime is imported only when check_parity runs, so `import moe_compile` works without it.
"""

from .exporter import TARGETS, export
from .parity import TOLERANCES, OutputParity, ParityReport, check_parity
from .report import ExportReport, LayerLowering

__all__ = ["ExportReport", "LayerLowering", "OutputParity", "ParityReport", "TARGETS", "TOLERANCES", "check_parity",
           "export"]
