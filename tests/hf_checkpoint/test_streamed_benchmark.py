"""The streamed-conversion benchmark script runs end to end on its tiny configuration (the 1B run is not for CI)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "streamed_mixtral.py"


def test_benchmark_tiny_configuration(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("streamed_mixtral", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setattr(sys, "argv", ["streamed_mixtral.py", "--size", "tiny", "--results", str(tmp_path)])
    benchmark.main()

    result = json.loads((tmp_path / "streamed_mixtral.json").read_text())
    assert result["output_shards"] == benchmark.SIZES["tiny"][0]["num_hidden_layers"] + 1
    assert result["two_layer_slice_max_abs_logit_diff"] <= 1e-5
    assert result["meta_device_parameters"] > result["setup"]["dense"]["parameters"]
    assert result["peak_rss_bytes"] > 0 and (tmp_path / "streamed_mixtral.md").is_file()
