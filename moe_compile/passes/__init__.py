"""Graph passes: capture (torch.fx), FFN patterns, the FFN -> MoE rewrite, and the pipeline that runs them."""

from .pipeline import convert, find_ffn_blocks
from .report import ConversionReport, ModuleNote, SiteReport

__all__ = ["ConversionReport", "ModuleNote", "SiteReport", "convert", "find_ffn_blocks"]
