"""The moe-compile command line: inspect, convert, export and check, and one-line errors with exit status 2."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moe_compile
from moe_compile.cli import CHECK_SHAPE, EXPORT_SHAPE, main
from moe_compile.evaluate import shared_label
from moe_compile.example_text import stdlib_text
from tests.conftest import logits_of, make_dense_model, save_hf_llama_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "examples" / "checkpoints" / "tiny_gpt_relu.safetensors"  # a trained byte-level GPT
# small calibration and validation: these tests check the plumbing, examples/eval_split_experts.py the quality
FAST_EVAL = ("--windows", "4", "--length", "32", "--calibration-windows", "8", "--calibration-tokens", "256",
             "--distill-steps", "0")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved_nanogpt(tmp_path_factory):
    """A converted nanoGPT written by `moe-compile convert`."""
    directory = tmp_path_factory.mktemp("nanogpt-moe")
    assert main(["convert", "--example", "nanogpt", "--num-experts", "4", "--out", str(directory)]) == 0
    return directory


def test_inspect_example_shows_sites_params_and_flops(capsys):
    code, out, err = run(capsys, "inspect", "--example", "nanogpt-inline", "--experts", "split", "--num-experts", "4")
    assert code == 0 and err == ""
    assert "transformer.h.0:fc_in..fc_out  Linear -> gelu -> Linear -> Dropout" in out
    assert "dense params" in out and "MoE FLOPs/tok" in out
    # split into 4 experts, top-2: half the FFN FLOPs plus the router
    assert "transformer.h.1:fc_in..fc_out  64       256   33,088        33,344      65,536           33,280" in out


def test_convert_example_writes_a_loadable_model(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", "--example", "nanogpt", "--routing", "switch", "--seed", "3",
                       "--out", str(tmp_path))
    assert code == 0
    assert "transformer.h.0.mlp" in out and "converted" in out and f"saved to {tmp_path}" in out
    model = moe_compile.load(tmp_path)
    assert model.moe_report.config == moe_compile.MoEConfig(routing="switch", seed=3)


def test_convert_hf_directory_matches_the_python_api(capsys, tmp_path):
    make_dense_model("hf-llama").save_pretrained(tmp_path / "dense")
    code, _, _ = run(capsys, "convert", "--hf", str(tmp_path / "dense"), "--experts", "split", "--num-experts", "4",
                     "--out", str(tmp_path / "moe"))
    assert code == 0

    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    expected = moe_compile.convert(dense, moe_compile.MoEConfig(experts="split", num_experts=4)).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(logits_of(moe_compile.load(tmp_path / "moe"), ids), logits_of(expected, ids))


def test_inspect_saved_model(capsys, saved_nanogpt):
    code, out, _ = run(capsys, "inspect", "--model", str(saved_nanogpt))
    assert code == 0
    assert "converted" in out and "model total" in out


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "moe_compile", "inspect", "--example", "nanogpt"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "transformer.h.1.mlp" in result.stdout and "FFN total" in result.stdout


@pytest.mark.parametrize("argv, message", [
    ([], r"the following arguments are required: COMMAND"),
    (["inspect"], r"one of the arguments --example --checkpoint --hf --gguf --model is required"),
    (["inspect", "--example", "nanogpt", "--hf", "x"], r"argument --hf: not allowed with argument --example"),
    (["inspect", "--example", "nanogpt", "--top-k", "9"],
     r"MoEConfig.top_k: top_k=9 is more than num_experts=8. Lower top_k or raise num_experts."),
    (["inspect", "--example", "nanogpt", "--routing", "magic"], r"MoEConfig.routing: unknown routing 'magic'"),
    (["inspect", "--example", "nanogpt", "--num-experts", "two"], r"argument --num-experts: invalid int value"),
    (["inspect", "--example", "gpt5"], r"unknown example model 'gpt5'. Choose one of nanogpt, nanogpt-inline"),
    (["convert", "--example", "nanogpt"], r"the following arguments are required: --out"),
    (["convert", "--hf", "/no/such/dir", "--out", "x"], r"--hf /no/such/dir: no such directory"),
    (["inspect", "--model", "/no/such/dir"], r"load: /no/such/dir is not a directory"),
    (["export", "/no/such/dir", "--target", "openvino", "--out", "m.onnx"], r"argument --target: invalid choice"),
    (["check", "/no/such/dir", "/no/such.onnx"], r"/no/such.onnx: no such file"),
    (["eval", "--checkpoint", "/no/such.safetensors"], r"load_checkpoint: /no/such.safetensors does not exist"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--top-k", "2"], r"eval sets top_k from each --active fraction"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--active", "0.3", "--no-calibration", "--windows", "1"],
     r"active fraction 0.3: 8 experts cannot run exactly that share"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--text", "/no/such.txt"], r"/no/such.txt: no such text file"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--length", "500"], r"--length 500: windows must be 1 to 128 tokens"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--no-calibration", "--calibration-text", "a.txt"],
     r"--no-calibration and --calibration-text contradict each other"),
    (["eval", "--checkpoint", str(CHECKPOINT), "--experts", "upcycle", "--no-calibration", "--windows", "1"],
     r"experts='upcycle' runs k whole copies of the FFN"),
    (["convert", "--hf", "x", "--format", "hf", "--calibrate", "--out", "y"], r"--format hf .* cannot calibrate"),
    (["convert", "--hf", "x", "--format", "hf", "--expert-bits", "4", "--out", "y"], r"an hf checkpoint keeps float"),
    (["convert", "--example", "nanogpt", "--expert-bits", "4", "--block-size", "1024", "--out", "y"],
     r"not multiples of block_size=1024"),
    (["convert", "--checkpoint", str(CHECKPOINT), "--calibrate", "--calibration-windows", "1", "--out", "y"],
     r"calibration builds split experts"),
])
def test_bad_input_prints_one_line_and_exits_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("moe-compile: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_saved_model_takes_no_config_flags(capsys, saved_nanogpt):
    code, _, err = run(capsys, "inspect", "--model", str(saved_nanogpt), "--top-k", "1")
    assert code == 2
    assert "--model takes no MoEConfig flags (got --top-k)" in err


def test_damaged_directory_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "moe_recipe.json").write_text("{")
    code, _, err = run(capsys, "inspect", "--model", str(tmp_path))
    assert code == 2 and "moe_recipe.json is not valid JSON" in err and err.count("\n") == 1


# --- export and check, wired to moe_compile.export ------------------------------------------------------------

def fake_check(passed, calls):
    def check_parity(model, onnx_path, inputs, *, dtype=None, tolerance=None):
        calls.append(SimpleNamespace(model=model, path=onnx_path, inputs=inputs, dtype=dtype))
        return SimpleNamespace(passed=passed, table=lambda: "parity table", to_dict=lambda: {"passed": passed})
    return check_parity


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_check_runs_another_shape_and_exits_1_on_failure(capsys, monkeypatch, saved_nanogpt, tmp_path, passed, code):
    calls = []
    monkeypatch.setattr(importlib.import_module("moe_compile.export"), "check_parity", fake_check(passed, calls),
                        raising=False)
    (tmp_path / "m.onnx").write_bytes(b"")

    status, out, _ = run(capsys, "check", str(saved_nanogpt), str(tmp_path / "m.onnx"), "--json")

    assert status == code and json.loads(out) == {"passed": passed}
    (ids,) = calls[0].inputs
    assert tuple(ids.shape) == CHECK_SHAPE != EXPORT_SHAPE and ids.dtype == torch.int64
    assert int(ids.max()) < 256 and calls[0].dtype is None


def test_export_then_check_with_onnx_runtime(capsys, saved_nanogpt, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "nanogpt-moe.onnx"
    code, out, err = run(capsys, "export", str(saved_nanogpt), "--target", "portable", "--out", str(onnx_path))
    assert code == 0, err
    assert onnx_path.is_file() and "target=portable" in out

    code, out, err = run(capsys, "check", str(saved_nanogpt), str(onnx_path), "--json")
    assert code == 0, out + err
    assert json.loads(out)["passed"] is True


def test_convert_with_int4_experts_exports_and_checks(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    saved, onnx_path = tmp_path / "moe", tmp_path / "moe.onnx"
    code, _, err = run(capsys, "convert", "--example", "nanogpt", "--num-experts", "4", "--expert-bits", "4",
                       "--block-size", "16", "--out", str(saved))
    assert code == 0, err
    code, out, err = run(capsys, "export", str(saved), "--target", "portable", "--out", str(onnx_path))
    assert code == 0 and "experts: 16 matmuls as b-bit weights" in out and "opset=21" in out, out + err
    code, out, err = run(capsys, "check", str(saved), str(onnx_path), "--json")
    assert code == 0 and json.loads(out)["passed"] is True, out + err


def test_export_tensorrt_target_and_engine(capsys, saved_nanogpt, tmp_path):
    onnx_path, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    code, _, err = run(capsys, "export", str(saved_nanogpt), "--target", "portable", "--out", str(onnx_path),
                       "--engine", str(engine))
    assert code == 2 and "use --target tensorrt" in err
    code, out, err = run(capsys, "export", str(saved_nanogpt), "--target", "tensorrt", "--out", str(onnx_path),
                         "--dtype", "bf16", "--engine", str(engine))
    assert onnx_path.is_file() and "moe_compile::moe_ffn" in out and "dtype=bfloat16" in out
    if importlib.util.find_spec("tensorrt") is None:  # the engine step fails on one line, after the ONNX file
        assert code == 2 and "TensorRT is not installed" in err and err.count("\n") == 1
    else:
        assert code == 0 and engine.is_file(), err


def test_eval_trained_checkpoint_per_active_fraction(capsys, tmp_path):
    code, out, _ = run(capsys, "eval", "--checkpoint", str(CHECKPOINT), "--active", "0.25", "1", "--shared-experts",
                       "0", *FAST_EVAL, "--json", str(tmp_path / "eval.json"))
    assert code == 0
    assert re.search(r"dense\s+100%", out) and re.search(r"MoE\s+25.0%\s+2 of 8 \(0 shared\)", out)
    result = json.loads((tmp_path / "eval.json").read_text())
    quarter, whole = result["rows"]
    assert whole["perplexity"] == pytest.approx(result["dense_perplexity"], rel=1e-5)  # k = E: the dense FFN
    assert quarter["perplexity"] > result["dense_perplexity"]
    assert whole["top1_agreement"] == 1.0 and 0 < quarter["top1_agreement"] < 1.0
    assert (quarter["config"]["split_strategy"], quarter["config"]["router_init"]) == ("coactivation", "calibrated")
    assert 0 < quarter["router_recall_held_out"] <= 1
    assert quarter["shared_per_site"] == [0] * 4


def test_eval_rows_name_the_shared_groups_their_sites_chose():
    assert shared_label({"shared_experts": 2, "shared_per_site": [3, 2, 3]}) == "2-3"
    assert shared_label({"shared_experts": 1, "shared_per_site": [1, 1]}) == "1"
    assert shared_label({"shared_experts": 1}) == "1"  # a row recorded before shared_per_site


def test_eval_hf_model_reads_text_with_its_tokenizer(capsys, tmp_path):
    save_hf_llama_with_tokenizer(tmp_path)
    code, out, _ = run(capsys, "eval", "--hf", str(tmp_path), "--num-experts", "4", "--active", "0.5", *FAST_EVAL)
    assert code == 0 and re.search(r"MoE\s+50.0%\s+2 of 4", out)

    (tmp_path / "tokenizer.json").unlink()
    code, _, err = run(capsys, "eval", "--hf", str(tmp_path), "--num-experts", "4", "--active", "0.5", *FAST_EVAL)
    assert code == 2 and "no tokenizer to read the text with" in err


def test_convert_with_calibration_flags(capsys, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(stdlib_text("validation").decode()[:20000])
    code, out, _ = run(capsys, "convert", "--checkpoint", str(CHECKPOINT), "--experts", "split", "--top-k", "4",
                       "--calibration-text", str(text), "--calibration-windows", "8", "--calibration-tokens", "256",
                       "--distill-steps", "3", "--no-compensate", "--shared-experts", "auto",
                       "--out", str(tmp_path / "moe"))
    assert code == 0
    config = moe_compile.load(tmp_path / "moe").moe_report.config
    assert (config.split_strategy, config.router_init, config.compensate, config.distill_steps) == \
        ("coactivation", "calibrated", False, 3)
    assert config.shared_experts in (0, 1, 2, 3)  # "auto", resolved on the calibration text


def test_text_generation_export_check_and_generate(capsys, tmp_path):
    """convert --hf (the tokenizer travels with the saved model), export --task text-generation, check the
    directory as a generator, generate text (streamed) and token ids; the dense HF directory exports as well."""
    pytest.importorskip("onnxruntime")
    hf, saved, decoder = tmp_path / "hf", tmp_path / "moe", tmp_path / "decoder"
    save_hf_llama_with_tokenizer(hf)
    code, _, err = run(capsys, "convert", "--hf", str(hf), "--out", str(saved), "--experts", "split", "--num-experts",
                       "4", "--combine", "weighted")
    assert code == 0, err
    assert (saved / "tokenizer.json").is_file()
    code, out, err = run(capsys, "export", str(saved), "--task", "text-generation", "--target", "portable", "--out",
                         str(decoder))
    assert code == 0, err
    assert "task=text-generation" in out and "tokenizer.json" in out and (decoder / "model.onnx").is_file()

    code, out, err = run(capsys, "check", str(saved), str(decoder), "--steps", "6", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["passed"] and report["steps"] == 6 and report["prompts"] == CHECK_SHAPE[0]

    code, out, err = run(capsys, "generate", str(decoder), "--prompt", "def return import", "--max-new-tokens", "5",
                         "--stop")
    assert code == 0, err
    assert len(out.split()) == 5 and "tokens/s" in err
    expected = moe_compile.generate(decoder, ["def return import"], 5, stop_tokens=[]).text[0]
    assert out.strip() == expected.strip()
    code, out, err = run(capsys, "generate", str(decoder), "--ids", "5 6 7", "3 4", "--max-new-tokens", "4", "--stop")
    assert code == 0 and [len(line.split()) for line in out.splitlines()] == [4, 4], err

    dense = tmp_path / "dense"  # ort: shared cache buffers; the LM head at the last position only
    code, out, err = run(capsys, "export", str(hf), "--task", "text-generation", "--target", "ort", "--logits", "last",
                         "--out", str(dense))
    assert code == 0 and (dense / "tokenizer.json").is_file(), err
    assert "past inputs may share a preallocated buffer" in out
    metadata = json.loads((dense / "moe_generation.json").read_text())
    assert metadata["logits"] == "last" and metadata["shared_cache"]
    code, out, err = run(capsys, "generate", str(dense), "--ids", "5 6 7", "--max-new-tokens", "4", "--stop")
    assert code == 0 and len(out.split()) == 4, err
    code, _, err = run(capsys, "export", str(hf), "--task", "text-generation", "--target", "ort", "--window-cache",
                       "--out", str(tmp_path / "windowed"))
    assert code == 2 and "no sliding-window attention layer" in err, err


@pytest.mark.parametrize("argv, message", [
    (["generate", "missing-dir", "--ids", "1 2"], "not a directory written by export(task='text-generation')"),
    (["export", "--task", "text-generation"], "the following arguments are required"),
])
def test_generation_commands_bad_input(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_check_fails_an_export_whose_ties_break_the_other_way(capsys, monkeypatch, tmp_path):
    """GPT-NeoX's first FFN sees the embeddings (parallel residual), so repeated ids tie in expert choice; `check`'s
    inputs repeat ids. An export whose top-k lets the higher index win a tie (the bug ONNX's TopK once caused)
    fails the check; the export as it is passes."""
    transformers = pytest.importorskip("transformers")
    from moe_compile.moe.routers import expert_choice

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=256)
    transformers.GPTNeoXForCausalLM(config).eval().save_pretrained(tmp_path / "dense")
    saved = tmp_path / "moe"
    assert main(["convert", "--hf", str(tmp_path / "dense"), "--num-experts", "2", "--top-k", "1", "--routing",
                 "expert_choice", "--experts", "split", "--out", str(saved)]) == 0
    capsys.readouterr()

    def higher_index_wins(scores, k, ordered=True):  # top_k with the tie-breaking key reversed
        n = scores.shape[-1]
        rank = (scores.topk(k, dim=-1).values.unsqueeze(-2) > scores.unsqueeze(-1)).sum(-1)
        key = rank.float() * n + torch.arange(n - 1, -1, -1, dtype=torch.float32)
        return key.topk(k, dim=-1, largest=False).indices

    for name, patched in (("right", False), ("tie-bugged", True)):
        with monkeypatch.context() as patch:
            if patched:
                patch.setattr(expert_choice, "top_k", higher_index_wins)
            assert main(["export", str(saved), "--target", "portable", "--out", str(tmp_path / f"{name}.onnx")]) == 0
        capsys.readouterr()
        code, out, _ = run(capsys, "check", str(saved), str(tmp_path / f"{name}.onnx"), "--json")
        assert (code, json.loads(out)["passed"]) == ((1, False) if patched else (0, True)), out
