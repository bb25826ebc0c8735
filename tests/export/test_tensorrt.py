"""export.tensorrt without TensorRT: the plugin's shape / type / tactic rules and profiles as plain functions, the
plugin definitions against TensorRT's documented signature rules (through a stand-in `tensorrt.plugin` that
records them), clear errors where TensorRT is missing; with TensorRT and a GPU, an engine end to end."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch

import moe_compile
from moe_compile.export import tensorrt as trt_export

from .conftest import EXPORT_SHAPE, token_ids


def test_output_shape_is_the_hidden_input_shape():
    assert trt_export.plugin_output_shape((37, 64)) == (37, 64)
    with pytest.raises(ValueError, match=r"\[T, d\]"):
        trt_export.plugin_output_shape((2, 37, 64))


def test_io_types_one_entry_per_input_and_output():
    entries = [e.strip() for e in trt_export.PLUGIN_IO_TYPES.split(",")]
    assert len(entries) == 7 + 1  # 7 inputs, 1 output
    assert entries[1] == "INT32"  # expert ids (the export casts TopK's INT64)
    float_entries = [e for i, e in enumerate(entries) if i != 1]
    assert set(float_entries) == {"FP32|FP16|BF16"}  # TensorRT: every `|` entry has the same option count


def test_tactics_name_every_kernel_config():
    from moe_compile.kernels.triton_moe import CONFIGS, pick_config

    tactics = trt_export.plugin_tactics()
    assert min(tactics) >= 1 and [trt_export.config_for_tactic(t, 64, 8) for t in tactics] == list(CONFIGS)
    assert trt_export.config_for_tactic(0, 4096, 8) == pick_config(4096, 8)


def test_profile_shapes_cover_dynamic_batch_and_sequence():
    assert trt_export.profile_shapes((-1, -1), (2, 16), (8, 512)) == ((1, 1), (2, 16), (8, 512))
    assert trt_export.profile_shapes((-1, -1, 64), (2, 16), (8, 512)) == ((1, 1, 64), (2, 16, 64), (8, 512, 64))
    with pytest.raises(ValueError, match="opt <= max"):
        trt_export.profile_shapes((-1, -1), (2, 1024), (8, 512))


class _Recorder(types.ModuleType):
    """A stand-in for tensorrt.plugin that records what register_plugin defines."""

    def __init__(self):
        super().__init__("tensorrt.plugin")
        self.defined = {}
        self.TensorDesc, self.Tensor = type("TensorDesc", (), {}), type("Tensor", (), {})
        self.AutoTuneCombination = lambda io_types, layouts, tactics: (io_types, layouts, tactics)
        for kind in ("register", "impl", "autotune"):
            setattr(self, kind, self._decorator(kind))

    def _decorator(self, kind):
        def decorator(plugin_id):
            def record(fn):
                self.defined[kind] = (plugin_id, fn)
                return fn
            return record
        return decorator


def test_plugin_definitions_follow_tensorrts_rules(monkeypatch):
    recorder = _Recorder()
    fake = types.ModuleType("tensorrt")
    fake.plugin = recorder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", recorder)
    monkeypatch.setattr(trt_export, "_registered", False)
    trt_export.register_plugin()

    assert {plugin_id for plugin_id, _ in recorder.defined.values()} == {"moe_compile::moe_ffn"}
    register = inspect.signature(recorder.defined["register"][1]).parameters
    impl = inspect.signature(recorder.defined["impl"][1]).parameters
    autotune = inspect.signature(recorder.defined["autotune"][1]).parameters
    inputs = ["x", "expert_ids", "gates", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    attributes = ["activation", "gated"]  # the ONNX node's attributes, same names
    # register: tensor descriptors first, then the attributes, annotated with their types
    assert list(register) == inputs + list(attributes)
    assert all(register[name].annotation is recorder.TensorDesc for name in inputs)
    assert [register[name].annotation for name in attributes] == [str, int]  # real types, not strings
    # impl: register's inputs, the attributes in register order, then outputs, stream, tactic
    assert list(impl) == inputs + list(attributes) + ["outputs", "stream", "tactic"]
    assert list(autotune) == inputs + ["outputs"]
    combos = recorder.defined["autotune"][1](*[None] * 8)
    assert combos == [(trt_export.PLUGIN_IO_TYPES, "LINEAR", trt_export.plugin_tactics())]


def _exported(tmp_path, dtype=torch.float16):
    model = moe_compile.convert(moe_compile.example_models.build_example("nanogpt"),
                                moe_compile.MoEConfig(num_experts=4, top_k=2, capacity_factor=None))
    path = tmp_path / "m.onnx"
    moe_compile.export(model, token_ids(EXPORT_SHAPE), path, target="tensorrt", dtype=dtype)
    return model, path


def test_missing_tensorrt_is_a_clear_error(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed: the error path is not reachable")
    (tmp_path / "m.engine").write_bytes(b"")
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        moe_compile.check_parity(torch.nn.Linear(2, 2), tmp_path / "m.engine", (torch.zeros(1, 2),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_matches_eager(tmp_path, dtype):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's index only); engine not built")
    if not torch.cuda.is_available():
        pytest.skip("a TensorRT engine needs a CUDA GPU")
    model, onnx_path = _exported(tmp_path, dtype)
    engine = trt_export.build_engine(onnx_path, tmp_path / "m.engine", opt_shape=(2, 16), max_shape=(4, 64))
    parity = moe_compile.check_parity(model, engine, token_ids((3, 23)))
    assert parity.runtime == "TensorRT" and parity.passed, parity.table()
