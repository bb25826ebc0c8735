"""Healing: a converted model trained end to end to its dense source (moe_compile.heal, moe-compile heal)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moe_compile as mc
from moe_compile.cli import main
from moe_compile.example_text import perplexity
from moe_compile.heal import LOSSES, HealingError, _batch, _loss, heal
from moe_compile.moe.layer import iter_moe_layers
from tests.conftest import save_hf_llama_with_tokenizer

SPLIT = mc.MoEConfig(num_experts=4, top_k=1, experts="split")  # 25% active, data-free: far from the dense model
SETTINGS = dict(tokens=12 * 4 * 16, length=16, batch_size=4, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(3))


def held_out_error(model, teacher, data, loss: str = "logits") -> float:
    """The loss on 8 windows no training step draws, every position scored."""
    with torch.no_grad():
        return float(_loss(model, teacher, _batch(data, 10**6, 1, 8, 16, None, None), loss))


def converted(dense):
    return mc.convert(dense, SPLIT, progress=False)


@pytest.mark.parametrize("loss", ("logits", "hidden", "logits+hidden"))
def test_healing_brings_the_model_to_the_dense_one_and_trains_only_the_moe_layers(hf_gpt2, data, loss):
    moe = converted(hf_gpt2)
    frozen = {name: p.clone() for name, p in moe.named_parameters() if ".mlp." not in name}
    routers = {name: p.clone() for name, p in moe.named_parameters() if ".router." in name}
    before = held_out_error(moe, hf_gpt2, data, loss)
    report = heal(moe, hf_gpt2, data, loss=loss, positions=8, **SETTINGS)
    assert held_out_error(moe, hf_gpt2, data, loss) < 0.6 * before
    assert all(not torch.equal(p, routers[name]) for name, p in moe.named_parameters() if name in routers)
    assert report.steps == 12 and report.tokens == 12 * 4 * 16 and len(report.losses) == 12
    assert all(torch.equal(p, frozen[name]) for name, p in moe.named_parameters() if name in frozen)
    assert all(p.requires_grad for p in moe.parameters()) and not moe.training
    assert mc.heal is heal and isinstance(report, mc.HealReport)


def test_sampled_positions_score_what_the_full_logits_score(hf_llama, data):
    moe = converted(hf_llama)
    batch = _batch(data, 0, 0, 2, 16, 5, 6)
    ids, scored = batch.ids, batch.scored
    assert scored.tolist() == sorted(set(scored.tolist())) and len(scored) == 6 and 0 not in scored.tolist()
    assert (ids[:, 0] == 5).all()
    with torch.no_grad():  # transformers' logits_to_keep against the full logits indexed
        full = torch.nn.functional.kl_div(moe(ids).logits[:, scored].log_softmax(-1).flatten(0, 1),
                                          hf_llama(ids).logits[:, scored].log_softmax(-1).flatten(0, 1),
                                          log_target=True, reduction="batchmean")
        assert float(_loss(moe, hf_llama, batch, "logits")) == pytest.approx(float(full), rel=1e-5)


def test_named_parameters_train_a_model_without_moe_layers(hf_gpt2, data):
    student = copy.deepcopy(hf_gpt2)
    noise = torch.randn(64 * 4, 64, generator=torch.Generator().manual_seed(0)) * 0.2
    with torch.no_grad():  # a damaged FFN in the first block
        student.transformer.h[0].mlp.c_proj.weight.add_(noise)
    before = held_out_error(student, hf_gpt2, data)
    heal(student, hf_gpt2, data, train=["transformer.h.0.mlp."], **SETTINGS)
    assert held_out_error(student, hf_gpt2, data) < 0.6 * before
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, hf_gpt2.transformer.h[1].mlp.c_fc.weight)


def far(moe):
    """`moe` with its experts' outputs 20 times too large: far from its teacher, the losses well above rounding."""
    with torch.no_grad():
        for _, layer in iter_moe_layers(moe):
            layer.down_weight.mul_(20)
    return moe


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, vocab_size=128)
    return transformers.BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def samples() -> list[list[int]]:
    """Sentences of 3 to 20 tokens, [CLS] = 1 first and [SEP] = 2 last, in no order."""
    generator = torch.Generator().manual_seed(4)
    return [[1] + torch.randint(3, 128, (int(n) - 2,), generator=generator).tolist() + [2]
            for n in torch.randint(3, 21, (300,), generator=generator)]


def test_an_encoder_heals_with_the_default_loss(bert, data):
    dense = bert
    moe = converted(dense)
    before = held_out_error(moe, dense, data, "logits+hidden")
    report = heal(moe, dense, data, **SETTINGS)
    assert report.settings["loss"] == "logits+hidden"
    assert held_out_error(moe, dense, data, "logits+hidden") < 0.95 * before


def test_samples_are_batched_by_length_and_their_padding_is_out_of_every_loss(bert, samples):
    moe = far(converted(bert))
    ordered = sorted((torch.tensor(sample) for sample in samples), key=len)
    batch = _batch(ordered, 3, 0, 4, 16, None, 8)
    lengths = batch.mask.sum(1)
    assert batch.tokens == int(lengths.sum()) >= 4 * 16 > batch.tokens - int(lengths[-1])  # filled, no more
    assert batch.scored is None and lengths.max() - lengths.min() <= 2  # like lengths together: little padding
    assert {tuple(row[:n].tolist()) for row, n in zip(batch.ids, lengths)} <= {tuple(s.tolist()) for s in ordered}
    assert _batch(ordered, 3, 0, 4, 16, None, 8).ids.equal(batch.ids)  # the same for the same seed and step
    padded_other = batch._replace(ids=torch.where(batch.mask.bool(), batch.ids, 77))
    with torch.no_grad():
        for loss in LOSSES:  # what padding holds changes nothing
            assert float(_loss(moe, bert, padded_other, loss)) == pytest.approx(float(_loss(moe, bert, batch, loss)),
                                                                                rel=1e-5)
        alone = [_batch([sample], 0, 0, 1, 16, None, None) for sample in ordered[:5]]
        together = _batch(ordered[:5], 0, 0, 100, 16, None, None)  # every token's KL, padded or not
        weighted = sum(float(_loss(moe, bert, one, "logits")) * one.tokens for one in alone) / together.tokens
        assert float(_loss(moe, bert, together, "logits")) == pytest.approx(weighted, rel=1e-4)


def test_an_encoder_heals_on_samples(bert, samples):
    moe = far(converted(bert))
    held_out = _batch(sorted((torch.tensor(s) for s in samples[250:]), key=len), 0, 0, 100, 16, None, None)
    with torch.no_grad():
        before = float(_loss(moe, bert, held_out, "hidden"))
    report = heal(moe, bert, samples[:250], loss="hidden", tokens=12 * 64, length=16, batch_size=4, lr=1e-2,
                  progress=False)
    with torch.no_grad():
        assert float(_loss(moe, bert, held_out, "hidden")) < 0.8 * before
    assert report.steps == 12 and report.tokens >= 12 * 64


def test_logits_loss_heals_a_model_without_hidden_states(nanogpt, data):
    moe = mc.convert(nanogpt, SPLIT, progress=False)
    teacher_ppl = perplexity(nanogpt, data, length=16, max_windows=16)
    gap_before = perplexity(moe, data, length=16, max_windows=16) - teacher_ppl
    report = heal(moe, nanogpt, data, eval_data=data[:600], eval_every=4 * 4 * 16, eval_windows=4,
                  **SETTINGS)
    assert perplexity(moe, data, length=16, max_windows=16) - teacher_ppl < 0.5 * gap_before
    assert [tokens for tokens, _ in report.curve] == [0, 256, 512, 768]
    assert report.teacher_perplexity == pytest.approx(perplexity(nanogpt, data[:600], length=16, max_windows=4))
    with pytest.raises(HealingError, match="loss='logits'"):
        heal(moe, nanogpt, data, loss="hidden", **SETTINGS)
    with pytest.raises(HealingError, match="attention_mask"):
        heal(moe, nanogpt, [[1, 2, 3]], **SETTINGS)


def test_a_run_is_deterministic_and_a_resumed_run_equals_an_uninterrupted_one(hf_llama, data, tmp_path):
    straight = converted(hf_llama)
    heal(straight, hf_llama, data, **SETTINGS)
    again = converted(hf_llama)
    heal(again, hf_llama, data, **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), again.state_dict().values()))

    def stop_at_step_5(report: mc.HealReport) -> None:
        if report.steps == 5:
            raise KeyboardInterrupt

    resumed = converted(hf_llama)
    with pytest.raises(KeyboardInterrupt):
        heal(resumed, hf_llama, data, checkpoint_dir=tmp_path, checkpoint_every=100, on_step=stop_at_step_5,
             **SETTINGS)
    fresh = converted(hf_llama)  # a new process: only the checkpoint carries the run
    report = heal(fresh, hf_llama, data, checkpoint_dir=tmp_path, **SETTINGS)
    assert report.steps == 12 and len(report.losses) == 12
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(HealingError, match="lr differ"):
        heal(converted(hf_llama), hf_llama, data, checkpoint_dir=tmp_path, **{**SETTINGS, "lr": 1e-3})


def test_bad_input_is_named(hf_gpt2, hf_llama, data):
    moe = converted(hf_gpt2)
    with pytest.raises(HealingError, match="no MoE layers"):
        heal(copy.deepcopy(hf_gpt2), hf_gpt2, data, **SETTINGS)
    with pytest.raises(HealingError, match="starts with any of"):
        heal(copy.deepcopy(hf_gpt2), hf_gpt2, data, train=["no.such."], **SETTINGS)
    with pytest.raises(HealingError, match="token ids"):
        heal(moe, hf_gpt2, data.float(), **SETTINGS)
    with pytest.raises(HealingError, match="too few"):
        heal(moe, hf_gpt2, data[:10], **SETTINGS)
    with pytest.raises(HealingError, match="loss="):
        heal(moe, hf_gpt2, data, loss="mse", **SETTINGS)
    with pytest.raises(HealingError, match="positions=0"):
        heal(moe, hf_gpt2, data, positions=0, **SETTINGS)
    with pytest.raises(HealingError, match="dense model the MoE model was converted from"):
        heal(moe, hf_llama, data, **SETTINGS)
    with pytest.raises(HealingError, match="non-empty list of token id sequences"):
        heal(moe, hf_gpt2, [[1, 2], []], **SETTINGS)
    with pytest.raises(HealingError, match="samples carry their own special tokens"):
        heal(moe, hf_gpt2, [[1, 2, 3]], bos=1, **SETTINGS)


def test_perplexity_with_bos_scores_the_same_predictions_after_a_leading_token(hf_llama, data):
    ids = data[:4 * 16 + 1]
    inputs = torch.cat([torch.zeros(4, 1, dtype=torch.long), ids[:-1].view(4, 16)], dim=1)
    with torch.no_grad():
        logits = hf_llama(inputs).logits[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[1:]).exp()
    assert perplexity(hf_llama, data, length=16, max_windows=4, bos=0) == pytest.approx(float(expected), rel=1e-5)


def test_cli_heals_a_saved_model_and_saves_it(tmp_path):
    model = tmp_path / "moe"
    assert main(["convert", "--example", "nanogpt", "--out", str(model), "--experts", "split", "--num-experts",
                 "4", "--top-k", "1"]) == 0
    out, report = tmp_path / "healed", tmp_path / "heal.json"
    assert main(["heal", str(model), "--example", "nanogpt", "--tokens", "256", "--length",
                 "16", "--eval-windows", "2", "--out", str(out), "--json", str(report)]) == 0
    healed, saved = mc.load(out), mc.load(model)
    assert not all(torch.equal(a, b) for a, b in zip(healed.state_dict().values(), saved.state_dict().values()))
    assert '"steps": 4' in report.read_text()
    assert main(["heal", str(model), "--example", "nanogpt", "--loss", "hidden", "--out", str(out)]) == 2


def test_cli_heals_on_paragraphs(tmp_path, capsys):
    dense, model = tmp_path / "dense", tmp_path / "moe"
    save_hf_llama_with_tokenizer(dense)
    assert main(["convert", "--hf", str(dense), "--out", str(model), "--experts", "split", "--num-experts", "4",
                 "--top-k", "1"]) == 0
    text = tmp_path / "paragraphs.txt"
    text.write_text("\n\n".join(" ".join(["the"] * n) for n in range(3, 40)))
    report = tmp_path / "heal.json"
    assert main(["heal", str(model), "--hf", str(dense), "--text", str(text), "--paragraphs", "--tokens", "256",
                 "--length", "16", "--eval-windows", "2", "--out", str(tmp_path / "healed"), "--json",
                 str(report)]) == 0
    healed = json.loads(report.read_text())
    assert healed["settings"]["data"] == "samples" and healed["steps"] == 4 and healed["tokens"] >= 256


def test_cli_names_a_missing_gguf_file(tmp_path, capsys):
    assert main(["eval", "--gguf", str(tmp_path / "model.gguf"), "--active", "0.5"]) == 2
    assert "no such .gguf file" in capsys.readouterr().err
