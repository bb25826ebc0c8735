"""moe_compile.save / load: round trips that restore trained weights, and refusals of damaged directories."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import moe_compile
from moe_compile import MoEConfig, RecipeError, aux_loss
from moe_compile.example_models import build_example
from tests.conftest import logits_of, make_dense_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


class TinyLM(nn.Module):
    """A user's own class: the library cannot rebuild it, so load takes a fresh instance."""

    def __init__(self, layers: int = 2, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(128, d)
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
                                  for _ in range(layers))
        self.head = nn.Linear(d, 128)

    def forward(self, idx):
        x = self.embed(idx)
        for ffn in self.ffns:
            x = x + ffn(x)
        return self.head(x)


def logits(model):
    with torch.no_grad():
        return logits_of(model, TOKENS)


def perturb(model):
    """Move every weight, so that re-converting the dense source cannot reproduce the saved model."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def converted(model, **config):
    return moe_compile.convert(model, MoEConfig(num_experts=4, **config)).eval()


@pytest.mark.parametrize("name, config", [
    ("nanogpt", dict(experts="split")),
    ("nanogpt-inline", dict(routing="switch")),
    ("hf-gpt2", dict(top_k=2)),
    ("hf-llama", dict(experts="split", split_strategy="random")),
])
def test_round_trip_restores_changed_weights(tmp_path, name, config):
    model = converted(make_dense_model(name), **config)
    perturb(model)
    expected = logits(model)
    moe_compile.save(model, tmp_path)

    loaded = moe_compile.load(tmp_path)

    assert type(loaded) is type(model) and not loaded.training
    assert [s.name for s in loaded.moe_report.converted] == [s.name for s in model.moe_report.converted]
    assert loaded.moe_report.config == model.moe_report.config
    assert torch.equal(logits(loaded), expected)


def test_round_trip_after_a_training_step(tmp_path):
    model = converted(make_dense_model("nanogpt")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(TOKENS)
    loss = nn.functional.cross_entropy(out.flatten(0, 1), TOKENS.flatten()) + aux_loss(model)[0]
    loss.backward()
    optimizer.step()
    model.eval()
    moe_compile.save(model, tmp_path)

    assert torch.equal(logits(moe_compile.load(tmp_path)), logits(model))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = converted(make_dense_model("hf-gpt2"))
    moe_compile.save(model, tmp_path)

    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored)
    loaded = moe_compile.load(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_recipe_records_source_config_sites_and_dtype(tmp_path):
    model = converted(make_dense_model("hf-llama")).to(torch.bfloat16)
    moe_compile.save(model, tmp_path)

    recipe = json.loads((tmp_path / "moe_recipe.json").read_text())
    assert recipe["format_version"] == 1
    assert recipe["source"]["kind"] == "huggingface" and recipe["source"]["class"] == "LlamaForCausalLM"
    assert recipe["source"]["config"]["hidden_size"] == 64
    assert recipe["moe_config"] == model.moe_report.config.to_dict()
    assert [s["name"] for s in recipe["sites"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert recipe["dtype"] == "bfloat16"
    assert moe_compile.load(tmp_path).lm_head.weight.dtype == torch.bfloat16


def test_user_class_loads_into_the_instance_given(tmp_path):
    torch.manual_seed(0)
    model = converted(TinyLM())
    perturb(model)
    moe_compile.save(model, tmp_path)
    assert json.loads((tmp_path / "moe_recipe.json").read_text())["source"] == {
        "kind": "custom", "class": f"{TinyLM.__module__}.TinyLM"}

    with pytest.raises(RecipeError, match=r"your own class .*TinyLM.*model=YourModel"):
        moe_compile.load(tmp_path)
    loaded = moe_compile.load(tmp_path, model=TinyLM())
    assert torch.equal(logits(loaded), logits(model))


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"no converted MoE sites. Convert it first"):
        moe_compile.save(build_example(), tmp_path)


# --- damaged or mismatched directories -------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    moe_compile.save(converted(TinyLM()), tmp_path)
    return tmp_path


def edit_recipe(directory, **changes):
    path = directory / "moe_recipe.json"
    recipe = json.loads(path.read_text())
    recipe.update(changes)
    path.write_text(json.dumps(recipe))


def edit_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_directory_or_files(saved, tmp_path):
    with pytest.raises(RecipeError, match=r"is not a directory"):
        moe_compile.load(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(RecipeError, match=r"model.safetensors is missing"):
        moe_compile.load(saved, model=TinyLM())
    (saved / "moe_recipe.json").unlink()
    with pytest.raises(RecipeError, match=r"moe_recipe.json is missing.*was not written by moe_compile.save"):
        moe_compile.load(saved, model=TinyLM())


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "moe_recipe.json").write_text("{not json"), r"is not valid JSON"),
    (lambda d: (d / "moe_recipe.json").write_text("[1, 2]"), r"is not a moe_compile recipe"),
    (lambda d: edit_recipe(d, format_version=99), r"format version 99, this moe_compile reads version 1"),
    (lambda d: edit_recipe(d, moe_config={"num_experts": 4, "routing": "nope"}),
     r"invalid MoEConfig \(MoEConfig.routing: unknown routing 'nope'"),
    (lambda d: edit_recipe(d, dtype="float99"), r"unknown dtype 'float99'"),
    (lambda d: edit_recipe(d, sites={}), r"\"sites\" a list"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), r"is not a readable safetensors file"),
], ids=["bad-json", "not-a-recipe", "format-version", "bad-config", "bad-dtype", "bad-sites",
        "bad-weights-file"])
def test_damaged_files_are_refused(saved, damage, message):
    damage(saved)
    with pytest.raises(RecipeError, match=message):
        moe_compile.load(saved, model=TinyLM())


@pytest.mark.parametrize("source, message", [
    ({"kind": "example", "name": "nanogpt", "config": {"layers": 2}}, r"source architecture is damaged \(TypeError"),
    ({"kind": "huggingface", "class": "NoSuchModel", "config": {}}, r"transformers .* has no class 'NoSuchModel'"),
    ({"kind": "pickle"}, r"unknown source kind 'pickle'"),
], ids=["example", "huggingface", "kind"])
def test_damaged_source_is_refused(saved, source, message):
    edit_recipe(saved, source=source)
    with pytest.raises(RecipeError, match=message):
        moe_compile.load(saved)


def test_model_with_other_sites_is_refused(saved):
    with pytest.raises(RecipeError, match=r"only in the recipe \['ffns.1'\], only in the model none. Pass a dense "
                                          r"instance of the architecture"):
        moe_compile.load(saved, model=TinyLM(layers=1))
    with pytest.raises(RecipeError, match=r"cannot re-apply the recorded conversion to Embedding"):
        moe_compile.load(saved, model=nn.Embedding(3, 4))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("head.bias", torch.zeros(5)), r"wrong shape: head.bias \(5,\) \(model expects \(128,\)\)"),
    (lambda t: t.pop("head.bias"), r"missing tensors \['head.bias'\], unexpected tensors none"),
    (lambda t: t.__setitem__("extra", torch.zeros(1)), r"missing tensors none, unexpected tensors \['extra'\]"),
], ids=["wrong-shape", "missing", "unexpected"])
def test_mismatched_tensors_are_refused(saved, change, message):
    edit_weights(saved, change)
    with pytest.raises(RecipeError, match=message):
        moe_compile.load(saved, model=TinyLM())
