"""export(task="text-generation"): one ONNX decoder with a KV cache per family, dense and converted, against eager
PyTorch (generation parity, greedy tokens) and transformers' own generate; the runner's batching, padding,
sampling and stop tokens; the routings refused for generation."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

import moe_compile
from moe_compile import MoECompileError, MoEConfig
from moe_compile.export import Generator
from moe_compile.export.decoder import cache_layout, share_cache_buffers

from ..conftest import VOCAB, make_dense_model

transformers = pytest.importorskip("transformers")

ATTENTION = dict(num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {  # family -> (config class, model class, config fields)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                                      **ATTENTION)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                                      **ATTENTION)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # a sliding-window layer of 4 tokens and a global one
               dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], **ATTENTION)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                                                max_position_embeddings=128, **ATTENTION)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=64, intermediate_size=128, **ATTENTION)),
}
SPLIT = dict(num_experts=8, top_k=2, experts="split", combine="weighted")
UPCYCLE = dict(num_experts=8, top_k=2, experts="upcycle", upcycle_noise=0.5)
PROMPTS = [[5, 5, 5, 9, 3, 3, 17, 5, 5, 40, 2], [7, 7, 1]]  # repeated ids; two lengths (left padding)


def build(family: str, seed: int = 0):
    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                 **fields)
    return getattr(transformers, model_class)(config).eval()


def convert(dense, **fields):
    model = moe_compile.convert(dense, MoEConfig(**fields))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # decisive routers, so that a wrong expert shows
        for _, layer in moe_compile.moe.iter_moe_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator) * 0.5)
    return model


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate on one prompt alone: its new greedy tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def genai_greedy(directory, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy tokens for one prompt, from the export directory."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model := og.Model(str(directory)))
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


@pytest.fixture(scope="module")
def exported_decoder(tmp_path_factory):
    cache = {}

    def get(family: str, conversion: str, target: str = "portable"):
        key = (family, conversion, target)
        if key not in cache:
            dense = build(family)
            model = dense if conversion == "dense" else convert(dense, **(SPLIT if conversion == "split" else UPCYCLE))
            directory = tmp_path_factory.mktemp(f"{family}-{conversion}-{target}")
            report = moe_compile.export(model, None, directory, task="text-generation", target=target)
            cache[key] = model, directory, report
        return cache[key]

    return get


CASES = [(family, "split") for family in FAMILIES] + [("gpt2", "dense"), ("llama", "dense"), ("llama", "upcycle")]


@pytest.mark.parametrize("family, conversion", CASES)
def test_decoder_matches_eager_at_every_step(exported_decoder, family, conversion):
    model, directory, _ = exported_decoder(family, conversion)
    parity = moe_compile.check_parity(model, directory, PROMPTS)  # a directory: generation parity, 32 steps
    assert parity.passed, parity.table()
    assert parity.max_abs <= 1e-5 and parity.token_agreement == 1.0, parity.table()
    if conversion == "dense":
        assert parity.routing is None and "no routing selection" in parity.routing_note
    else:  # every layer's choices at the prefill and at each of the 32 steps, per prompt
        layers = len(model.moe_report.converted)
        assert parity.routing.selections == len(PROMPTS) * 32 * layers, parity.table()
        assert parity.routing.share == 1.0, parity.table()


@pytest.mark.parametrize("family, target", [("gpt2", "portable"), ("gemma3", "portable"), ("gpt2", "ort"),
                                            ("gemma3", "ort")])
def test_batched_left_padded_generation_equals_transformers_generate(exported_decoder, family, target):
    """Our runner on a batch of prompts of two lengths; transformers' generate on each prompt alone. On the ort
    target the cache is one shared buffer per layer, written in place."""
    model, directory, report = exported_decoder(family, "split", target)
    assert len(report.shared_cache) == (4 if target == "ort" else 0)  # 2 layers' keys and values
    result = moe_compile.generate(directory, PROMPTS, max_new_tokens=20, stop_tokens=[])
    assert result.tokens == [transformers_greedy(model, prompt, 20) for prompt in PROMPTS]
    assert result.time_to_first_token_s > 0 and len(result.step_times_s) == 19 and result.kv_cache_bytes > 0


def test_decoder_layout_is_optimum_s(exported_decoder):
    _, directory, report = exported_decoder("llama", "split")
    graph = onnx.load(str(directory / "model.onnx")).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
    assert outputs == ["logits"] + [name.replace("past_key_values", "present") for name in past]
    dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, "past_sequence", 16]
    assert {"config.json", "genai_config.json", "moe_generation.json"} <= set(report.files)
    genai = json.loads((directory / "genai_config.json").read_text())["model"]
    assert genai["type"] == "llama" and genai["decoder"]["num_key_value_heads"] == 2
    assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_target_generates_with_grouped_query_attention_over_the_cache(exported_decoder, family):
    model, directory, report = exported_decoder(family, "upcycle", "ort")  # Gemma's gated GELU experts: portable
    graph = onnx.load(str(directory / "model.onnx")).graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert report.attention_fused == 2 and len(attention) == 2
    outputs = {v.name for v in graph.output}
    for i, node in enumerate(attention):  # reads the past in place and writes the present itself
        assert node.input[3:5] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert set(node.output[1:]) == {f"present.{i}.key", f"present.{i}.value"} <= outputs
    parity = moe_compile.check_generation(model, directory, PROMPTS, steps=8)  # left padding: the mask as bias
    assert parity.passed and parity.token_agreement == 1.0, parity.table()
    assert report.shared_cache == json.loads((directory / "moe_generation.json").read_text())["shared_cache"]
    assert report.shared_cache == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_shared_cache_graph_also_takes_an_exact_past(exported_decoder, family):
    """The past length comes from the attention mask, so the graph our runner feeds with preallocated buffers
    generates the same tokens when fed exact pasts and fresh presents, as optimum and onnxruntime-genai do."""
    _, directory, _ = exported_decoder(family, "split", "ort")
    generator = Generator(directory)
    shared = generator.generate(PROMPTS, max_new_tokens=12, stop_tokens=[])
    assert shared.kv_cache_bytes == 2 * 2 * len(PROMPTS) * 2 * (11 + 12) * 16 * 4  # layers, k/v, b, heads, len, dim
    generator.shared_cache = set()
    exact = generator.generate(PROMPTS, max_new_tokens=12, stop_tokens=[])
    assert exact.tokens == shared.tokens and exact.kv_cache_bytes < shared.kv_cache_bytes


def test_cache_buffers_are_shared_only_where_every_past_feeds_its_attention_op(exported_decoder):
    model, directory, _ = exported_decoder("llama", "split")  # portable: each past feeds a Concat
    layout = cache_layout(model)
    graph = onnx.load(str(directory / "model.onnx"))
    before = graph.SerializeToString()
    assert not share_cache_buffers(graph, layout) and graph.SerializeToString() == before
    _, directory, _ = exported_decoder("llama", "split", "ort")
    graph = onnx.load(str(directory / "model.onnx"))  # shared: but p can come only from an attention mask
    assert not share_cache_buffers(graph, dataclasses.replace(layout, attention_mask=False))


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_a_window_cache_keeps_a_sliding_layer_to_its_window(tmp_path, target):
    """Gemma 3 with a window of 4 (layer 0 sliding, layer 1 full): with window_cache the sliding layer's cache holds
    at most 3 positions, and the decoder still computes every step as eager does, past the window and in left-padded
    batches; on the ort target the full layer's buffers are shared and the windowed layer's are not."""
    model = convert(build("gemma3"), **SPLIT)
    report = moe_compile.export(model, None, tmp_path, task="text-generation", target=target, window_cache=True)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_window", 16]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert "genai_config.json" not in report.files  # genai sizes every layer's cache alike
    assert report.shared_cache == (["past_key_values.1.key", "past_key_values.1.value"] if target == "ort" else [])
    parity = moe_compile.check_generation(model, tmp_path, PROMPTS, steps=12)
    assert parity.passed and parity.max_abs <= 1e-5 and parity.token_agreement == 1.0, parity.table()
    assert parity.routing.share == 1.0, parity.table()
    result = moe_compile.generate(tmp_path, PROMPTS, max_new_tokens=12, stop_tokens=[])
    assert result.tokens == [transformers_greedy(model, prompt, 12) for prompt in PROMPTS]
    full = 11 + 12 if target == "ort" else 11 + 11  # a shared buffer holds the whole capacity
    assert result.kv_cache_bytes == 2 * len(PROMPTS) * 2 * (3 + full) * 16 * 4  # k/v, b, heads, positions, dim


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_last_position_logits_generate_the_same_tokens(exported_decoder, tmp_path, target):
    """logits='last': the LM head runs at the last position only (logits [b, 1, vocab]); the decoder generates what
    the all-positions one does, in our runner and in onnxruntime-genai."""
    model, directory, _ = exported_decoder("llama", "split", target)
    moe_compile.export(model, None, tmp_path, task="text-generation", target=target, logits="last")
    logits = onnx.load(str(tmp_path / "model.onnx")).graph.output[0]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, VOCAB]
    parity = moe_compile.check_generation(model, tmp_path, PROMPTS, steps=8)
    assert parity.passed and parity.token_agreement == 1.0, parity.table()
    tokens = moe_compile.generate(tmp_path, PROMPTS, 12, stop_tokens=[]).tokens
    assert tokens == moe_compile.generate(directory, PROMPTS, 12, stop_tokens=[]).tokens
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (extra: genai)")
    assert genai_greedy(tmp_path, PROMPTS[0], 12) == tokens[0]


def test_window_cache_is_refused_without_sliding_layers(exported_decoder, tmp_path):
    model, _, _ = exported_decoder("llama", "split")
    with pytest.raises(MoECompileError, match="no sliding-window attention layer"):
        moe_compile.export(model, None, tmp_path, task="text-generation", window_cache=True)
    with pytest.raises(MoECompileError, match="apply to task='text-generation'"):
        moe_compile.export(model, torch.zeros(1, 4, dtype=torch.long), tmp_path / "m.onnx", window_cache=True)


def test_tokens_do_not_depend_on_batch_mates(exported_decoder):
    _, directory, _ = exported_decoder("qwen2", "split")
    generator = Generator(directory)
    together = generator.generate(PROMPTS + [[3] * 9], 12, stop_tokens=[]).tokens
    alone = [generator.generate([prompt], 12, stop_tokens=[]).tokens[0] for prompt in PROMPTS]
    assert together[:2] == alone


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported_decoder):
    _, directory, _ = exported_decoder("gpt2", "split")
    generator = Generator(directory)
    greedy = generator.generate(PROMPTS, 10, stop_tokens=[]).tokens
    options = dict(do_sample=True, temperature=1.5, top_p=0.9, stop_tokens=[])
    first, again = (generator.generate(PROMPTS, 10, seed=3, **options).tokens for _ in range(2))
    assert first == again and first != greedy
    assert generator.generate(PROMPTS, 10, seed=3, do_sample=True, top_k=1, stop_tokens=[]).tokens == greedy
    assert generator.generate(PROMPTS, 10, seed=4, **options).tokens != first


def test_stop_tokens_end_each_sequence(exported_decoder):
    _, directory, _ = exported_decoder("gpt2", "split")
    generator = Generator(directory)
    free = generator.generate(PROMPTS, 10, stop_tokens=[]).tokens
    stop = free[0][3]
    stopped = generator.generate(PROMPTS, 10, stop_tokens=[stop]).tokens
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    second = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == second


@pytest.mark.parametrize("fields, match", [
    (dict(num_experts=4, routing="expert_choice", experts="split"), "expert-choice routing"),
    (dict(num_experts=4, routing="switch", experts="split"), "capacity_factor=1.25"),
    (dict(num_experts=4, routing="token_choice", capacity_factor=1.0), "capacity_factor=1.0"),
])
def test_routings_that_cannot_generate_are_refused(tmp_path, fields, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = moe_compile.convert(build("llama"), MoEConfig(**fields))
    with pytest.raises(MoECompileError, match=match):
        moe_compile.export(model, None, tmp_path / "out", task="text-generation")


def test_model_without_a_cache_is_refused_with_the_way_out(nanogpt, tmp_path):
    with pytest.raises(MoECompileError, match="no KV cache interface.*task='forward'"):
        moe_compile.export(nanogpt, None, tmp_path / "out", task="text-generation")


def test_prompt_only_export_handed_to_the_runner_says_which_export(tmp_path):
    model = build("gpt2")
    moe_compile.export(model, (torch.zeros(2, 4, dtype=torch.long),), tmp_path / "m.onnx")
    for path in (tmp_path, tmp_path / "m.onnx"):
        with pytest.raises(MoECompileError, match="task='text-generation'"):
            Generator(path)


def test_bad_generation_arguments(exported_decoder):
    _, directory, _ = exported_decoder("gpt2", "split")
    generator = Generator(directory)
    with pytest.raises(MoECompileError, match="max_new_tokens"):
        generator.generate(PROMPTS, 0)
    with pytest.raises(MoECompileError, match="temperature > 0"):
        generator.generate(PROMPTS, 4, do_sample=True, temperature=0.0)
    with pytest.raises(MoECompileError, match=r"token id in \[0, 128\)"):
        generator.generate([[1, 500]], 4)
    with pytest.raises(MoECompileError, match="no tokenizer.json"):
        generator.generate("hello", 4)


def test_wrong_tokens_fail_generation_parity(exported_decoder):
    """The check fails a decoder that computes something else: here another model's weights."""
    _, directory, _ = exported_decoder("llama", "split")
    other = convert(build("llama", seed=1), **SPLIT)
    parity = moe_compile.check_generation(other, directory, PROMPTS, steps=4)
    assert not parity.passed and parity.max_abs > 1e-2
    assert parity.routing.share < 1.0  # another router's weights choose other experts
    assert parity.mismatches and parity.near_ties < len(parity.mismatches)


@pytest.mark.parametrize("tracer", ["jit.trace", "onnx.export(dynamo=False)"])
def test_tracing_exporters_get_an_error_naming_torch_export(tracer, tmp_path):
    """torch.jit.trace and the TorchScript ONNX exporter (which optimum's exporter uses) cannot follow the host
    read of the sorted dispatch; the error says so and names moe_compile.export."""
    model = convert(build("gpt2"), **SPLIT)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(moe_compile.LoweringError, match="only torch.export captures.*moe_compile.export"):
        if tracer == "jit.trace":
            torch.jit.trace(model, ids, strict=False)
        else:
            torch.onnx.export(model, (ids,), str(tmp_path / "m.onnx"), dynamo=False)


GENAI_FAMILIES = ["llama", "qwen2", "gemma3", "phi"]  # model types onnxruntime-genai knows (not GPT-2, OPT)


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("family", GENAI_FAMILIES)
def test_onnxruntime_genai_loads_the_directory_and_generates_the_same_tokens(exported_decoder, family, target):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (extra: genai)")
    _, directory, _ = exported_decoder(family, "split", target)
    search = json.loads((directory / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] == (target == "ort")  # genai then preallocates the cache too
    ours = moe_compile.generate(directory, [PROMPTS[0]], 16, stop_tokens=[]).tokens[0]
    assert genai_greedy(directory, PROMPTS[0], 16) == ours


def test_no_genai_config_for_model_types_genai_does_not_know(exported_decoder):
    _, directory, report = exported_decoder("gpt2", "split")
    assert "genai_config.json" not in report.files and not (directory / "genai_config.json").exists()


class MaskedMLP(torch.nn.Module):
    """A gated MLP written so that torch.fx cannot trace it (a factory call on a traced size): convert captures
    it with torch.export."""

    def __init__(self, mlp):
        super().__init__()
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        keep = torch.ones(x.shape[1], 1)
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)) * keep


def test_block_captured_by_torch_export_generates(tmp_path):
    dense = build("llama")
    for layer in dense.model.layers:
        layer.mlp = MaskedMLP(layer.mlp)
    model = convert(dense, **SPLIT)
    assert all("torch.export graph" in site.reason for site in model.moe_report.converted)
    moe_compile.export(model, None, tmp_path, task="text-generation")
    parity = moe_compile.check_generation(model, tmp_path, PROMPTS, steps=8)
    assert parity.passed and parity.token_agreement == 1.0, parity.table()


@pytest.mark.parametrize("conversion", ["dense", "split", "upcycle"])
def test_a_hand_written_gpt_with_a_tuple_cache_generates(tmp_path, conversion):
    """The embedded hand-written GPT takes `past` (a (keys, values) pair per block) and use_cache, and its blocks
    are captured with torch.export on a call without a cache: the decoder export calls them with one, and the
    exported decoder computes every step as eager does. It takes no attention mask, so the runner generates
    batches of prompts of one length only, and says so for others."""
    dense = make_dense_model("gpt-runtime-mask")
    model = dense if conversion == "dense" else moe_compile.convert(
        dense, MoEConfig(**(SPLIT if conversion == "split" else UPCYCLE)), example_inputs=torch.zeros(1, 1).long())
    report = moe_compile.export(model, None, tmp_path, task="text-generation")
    assert report.files == ["moe_generation.json"]  # no transformers config: the clients need one
    parity = moe_compile.check_parity(model, tmp_path, PROMPTS)
    assert parity.passed and parity.max_abs <= 1e-5 and parity.token_agreement == 1.0, parity.table()
    assert conversion == "dense" or parity.routing.share == 1.0, parity.table()
    prompts = [PROMPTS[0][:6], PROMPTS[0][5:]]
    result = moe_compile.generate(tmp_path, prompts, max_new_tokens=32, stop_tokens=[])
    sequence = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(32):
            sequence = torch.cat([sequence, model(sequence)[:, -1:].argmax(-1)], dim=1)
    assert result.tokens == sequence[:, 6:].tolist()
    if conversion == "split":  # logits="last": the list-cache model's logits sliced to the last position
        moe_compile.export(model, None, tmp_path / "last", task="text-generation", logits="last")
        last = moe_compile.generate(tmp_path / "last", prompts, max_new_tokens=32, stop_tokens=[])
        assert last.tokens == result.tokens
    with pytest.raises(MoECompileError, match="takes no attention mask .* prompts of one length"):
        moe_compile.generate(tmp_path, PROMPTS, max_new_tokens=2)
