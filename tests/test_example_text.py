"""The standard library's text: its splits, and the windows perplexity is scored on."""

from __future__ import annotations

import pytest
import torch

from moe_compile import example_text
from moe_compile.example_text import perplexity, score, stdlib_prose


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(3))


def test_spread_windows_sample_the_whole_text_and_consecutive_ones_its_start(hf_llama, data):
    def expected(starts):
        ids = torch.stack([data[s:s + 17] for s in starts])
        with torch.no_grad():
            logits = hf_llama(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return float(loss.exp())

    spread, predictions = score(hf_llama, data, length=16, max_windows=3, spread=True)  # stride (4000 - 17) // 2
    assert spread == pytest.approx(expected([0, 1991, 3982]), rel=1e-5) and predictions.shape == (3, 16)
    assert perplexity(hf_llama, data, length=16, max_windows=3) == pytest.approx(expected([0, 16, 32]), rel=1e-5)
    assert perplexity(hf_llama, data, length=16, max_windows=1) == pytest.approx(expected([0]), rel=1e-5)


def test_windows_whose_logits_pass_the_budget_are_scored_in_smaller_batches_alike(hf_llama, data, monkeypatch):
    whole, predictions = score(hf_llama, data, length=16, max_windows=7)
    calls = []
    monkeypatch.setattr(example_text, "LOGIT_BUDGET", 3 * 16 * 128)  # 3 windows of 16 tokens of a 128-token vocab
    counted = lambda x: calls.append(len(x)) or hf_llama(x)  # noqa: E731
    split, split_predictions = score(counted, data, length=16, max_windows=7)
    assert calls == [1, 3, 3] and split == pytest.approx(whole, rel=1e-6) and split_predictions.equal(predictions)


def test_the_library_split_holds_the_training_prose_and_more_but_not_the_validation_files():
    library = stdlib_prose("library").decode()
    training = stdlib_prose("train").decode().split("\n\n")
    validation = stdlib_prose("validation").decode().split("\n\n")
    assert all(text in library for text in training) and len(library) > 4 * sum(map(len, training))
    assert sum(text in library for text in validation) < 0.02 * len(validation)  # a few generic ones recur elsewhere
    with pytest.raises(ValueError, match="'train', 'validation' or 'library'"):
        stdlib_prose("all")
