"""ExportReport: what moe_compile.export wrote, and how it lowered each MoE layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..table import format_table


@dataclass
class LayerLowering:
    name: str  # qualified name of the MoE layer in the model
    routing: str  # switch | token_choice | expert_choice
    lowering: str  # "com.microsoft.MoE" | "portable"
    capacity: str  # the capacity C used, as a formula of the token count T (or group size S)
    may_drop: bool  # whether the exported layer can leave a token's choice unprocessed
    reason: str = ""  # why the layer fell back to the portable lowering, or a note on its capacity


@dataclass
class ExportReport:
    path: str
    target: str
    dtype: str
    layers: list[LayerLowering] = field(default_factory=list)
    opset: Optional[int] = None
    task: str = "forward"  # or "text-generation": `path` is then the decoder with a KV cache in its directory
    files: list[str] = field(default_factory=list)  # text-generation: the files written beside it
    attention_fused: int = 0  # target ort: attention subgraphs rewritten into ONNX Runtime's fused ops
    quantized_matmuls: int = 0  # expert matmuls written as b-bit weights (moe_compile.quantize_experts)
    shared_cache: list[str] = field(default_factory=list)  # past inputs that may share a buffer with their present

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "task": self.task, "target": self.target, "dtype": self.dtype,
                "opset": self.opset, "files": self.files,
                "attention_fused": self.attention_fused, "quantized_matmuls": self.quantized_matmuls,
                "shared_cache": self.shared_cache,
                "layers": [asdict(layer) for layer in self.layers]}

    def table(self) -> str:
        task = "" if self.task == "forward" else f"task={self.task}, "
        head = f"ONNX export: {self.path}  ({task}target={self.target}, dtype={self.dtype}, opset={self.opset})"
        if self.attention_fused:
            head += f"\nattention: {self.attention_fused} layers fused into ONNX Runtime attention ops"
        if self.shared_cache:
            head += (f"\nKV cache: {len(self.shared_cache)} past inputs may share a preallocated buffer with their "
                     "present (written in place)")
        if self.quantized_matmuls:
            head += (f"\nexperts: {self.quantized_matmuls} matmuls as b-bit weights (DequantizeLinear + MatMul; "
                     "ONNX Runtime: MatMulNBits)")
        if self.files:
            head += f"\nbeside it: {', '.join(self.files)}"
        rows = [("layer", "routing", "lowering", "capacity", "may drop", "note")]
        rows += [(layer.name, layer.routing, layer.lowering, layer.capacity, "yes" if layer.may_drop else "no",
                  layer.reason) for layer in self.layers]
        return format_table(rows, head)

    def __str__(self) -> str:
        return self.table()
