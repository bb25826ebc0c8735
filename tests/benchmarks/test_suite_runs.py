"""The benchmark suite runs end to end on its tiny configuration and writes every result file (the figures
themselves are measured by running it, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def test_tiny_suite_writes_results(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark suite's plot needs the `plot` extra (matplotlib)")
    subprocess.run([sys.executable, str(RUNNER), "--tiny", "--out", str(tmp_path)], check=True, capture_output=True)
    layer, model = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("layer", "model"))
    variants = {(row["variant"], row["runtime"]) for row in layer["runs"][0]["rows"]}
    assert {("split 8/2", "onnxruntime"), ("split 8/2", "eager"), ("upcycle 8/2 com.microsoft.MoE", "onnxruntime"),
            ("split 8/2 HF loop", "eager"), ("split 8/2 every-expert graph", "onnxruntime")} <= variants
    assert all(row["ms"] > 0 for row in layer["runs"][0]["rows"])
    assert {row["model"] for row in model["build"]} == {"dense", "split", "upcycle"}
    assert 0 < model["runs"][0]["ffn_share_of_dense_onnx"] and (tmp_path / "layer.png").stat().st_size > 0
    assert "| split 8/2 | onnxruntime |" in (tmp_path / "layer.md").read_text()


def test_tiny_decode_benchmark_writes_results(tmp_path):
    pytest.importorskip("matplotlib", reason="the decode benchmark's plot needs the `plot` extra (matplotlib)")
    script = RUNNER.parent / "decode.py"
    subprocess.run([sys.executable, str(script), "--tiny", "--family", "gpt2", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    results = json.loads((tmp_path / "decode.json").read_text())
    rows = results["families"][0]["rows"]
    assert {(r["variant"], r["runtime"]) for r in rows} >= {("split 8/2", "onnxruntime"), ("split 8/2", "eager"),
                                                            ("upcycle 8/2", "onnxruntime"), ("dense", "eager")}
    assert all(r["per_token_ms"] > 0 and r["ttft_ms"] > 0 for r in rows)
    assert any("prefill_amdahl_bound" in r for r in rows) and (tmp_path / "decode.png").stat().st_size > 0


def test_tiny_granularity_benchmark_writes_results(tmp_path):
    subprocess.run([sys.executable, str(RUNNER.parent / "granularity.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    results = json.loads((tmp_path / "granularity.json").read_text())
    assert [row["layer"] for row in results["rows"]] == ["dense FFN", "split 8/2", "split 16/4"]
    assert all(row["ms"]["32"] > 0 for row in results["rows"])
    assert all(sum(row["phases_ms"].values()) > 0 and row["one_pass_ms"] >= 0 for row in results["rows"][1:])
