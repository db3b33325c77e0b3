"""The fast recipe's warm start reads at most one pass over the data; steps=0 / ls_tokens."""

from __future__ import annotations

import pytest
import torch

from tl_lenses.lenses.tuned.train import train_tuned_lens
from tl_lenses.streams import TensorRows, TokenStream
from tl_lenses.tiny import tiny_default


class CountingRows(TensorRows):
    """TensorRows that remember every row they hand out (rows are told apart by token 0)."""

    def __init__(self, tokens, seed=0):
        super().__init__(tokens, seed)
        self.drawn: list[int] = []

    def next_batch(self, n_rows):
        batch = super().next_batch(n_rows)
        self.drawn += batch[:, 0].tolist()
        return batch


def _rows(n: int = 30, pos: int = 8) -> torch.Tensor:
    """``n`` rows of ``pos`` tokens; row i starts with token i, so rows can be told apart."""
    rows = torch.randint(0, 256, (n, pos), generator=torch.Generator().manual_seed(3))
    rows[:, 0] = torch.arange(n)
    return rows


@pytest.fixture(scope="module")
def model():
    return tiny_default("gpt2")


def test_a_small_tensor_is_read_once_by_the_warm_start(model):
    """240 tokens, ls_tokens=32768: one epoch of whole batches, each row once, not 137 reads."""
    source = CountingRows(_rows())
    result = train_tuned_lens(model, source, steps=0, batch_size=8, progress=False)
    assert result.config["ls_tokens"] == 32768                 # the default was asked for
    assert len(source.drawn) == 24 == len(set(source.drawn))    # 3 batches of 8; 6 rows left
    assert result.warm_start_tokens == 24 * 8 and result.warm_start_stop == "data"
    assert result.steps == 0 and result.losses == [] and result.tokens_seen == 0
    assert result.lens.weight.abs().sum() > 0                   # the least-squares lens alone


def test_a_capped_warm_start_equals_asking_for_what_the_data_holds(model):
    capped = train_tuned_lens(model, _rows(), steps=0, batch_size=8, ls_tokens=10**9,
                              progress=False)
    exact = train_tuned_lens(model, _rows(), steps=0, batch_size=8, ls_tokens=24 * 8,
                             progress=False)
    assert exact.warm_start_stop == "ls_tokens" and capped.warm_start_stop == "data"
    for name, value in exact.lens.state_dict().items():
        assert torch.equal(capped.lens.state_dict()[name], value), name


def test_ls_tokens_below_the_data_is_rounded_up_to_whole_batches(model):
    source = CountingRows(_rows())
    result = train_tuned_lens(model, source, steps=0, batch_size=8, ls_tokens=100,
                              progress=False)
    assert len(source.drawn) == 16 and result.warm_start_tokens == 128     # 2 x 64 >= 100
    assert result.warm_start_stop == "ls_tokens"


def test_the_kl_phase_continues_after_a_capped_warm_start(model):
    """The KL steps draw the next epoch's batches (a finite tensor never runs out)."""
    source = CountingRows(_rows())
    result = train_tuned_lens(model, source, steps=4, batch_size=8, progress=False)
    assert result.steps == 4 and result.stop_reason == "steps"
    assert len(source.drawn) == 24 + 4 * 8 and result.warm_start_tokens == 192


def test_a_stream_is_read_to_its_end_once(model, tmp_path):
    texts = [f"text number {i} with a few words in it " * (2 + i % 3) for i in range(10)]
    whole = TokenStream(model, texts=texts, seq_len=8)
    full_batches = 0
    while whole.next_batch(4).shape[0] == 4:
        full_batches += 1
    result = train_tuned_lens(model, TokenStream(model, texts=texts, seq_len=8), steps=3,
                              batch_size=4, progress=False)
    assert result.warm_start_stop == "data" and result.stop_reason == "data"
    assert result.warm_start_tokens == full_batches * 4 * 8 and result.steps == 0


@pytest.mark.parametrize("recipe", ["fast", "reference"])
def test_no_warm_start_and_no_steps_leave_the_identity_lens(model, recipe):
    result = train_tuned_lens(model, _rows(), steps=0, ls_tokens=0, recipe=recipe,
                              batch_size=8, progress=False)
    assert result.warm_start_stop == "none" and result.warm_start_tokens == 0
    assert result.steps == 0 and not result.lens.weight.any() and not result.lens.bias.any()


def test_the_reference_recipe_ignores_ls_tokens(model):
    source = CountingRows(_rows())
    result = train_tuned_lens(model, source, recipe="reference", steps=1, batch_size=8,
                              ls_tokens=64, progress=False)
    assert result.warm_start_stop == "none" and result.warm_start_tokens == 0
    assert len(source.drawn) == 8


def test_batches_before_repeat_counts_the_rest_of_the_epoch():
    rows = TensorRows(_rows(30))
    assert rows.batches_before_repeat(8) == 3
    rows.next_batch(8)
    assert rows.batches_before_repeat(8) == 2
    rows.next_batch(8), rows.next_batch(8)
    assert rows.batches_before_repeat(8) == 3                   # a new epoch
    assert TensorRows(_rows(5)).batches_before_repeat(8) == 1   # one batch of all 5 rows


def test_the_command_line_says_what_the_warm_start_did(tmp_path, capsys):
    import json

    from tl_lenses._compat import DEFAULT_BACKEND
    from tl_lenses.cli import main

    out = tmp_path / "lens"
    argv = ["train-tuned", "--model", "tiny-gpt2", "--backend", DEFAULT_BACKEND, "--generate",
            "4", "--seq-len", "16", "--held-out", "0.25", "--out", str(out), "--steps", "0",
            "--batch-size", "2", "--lens-device", "cpu"]
    assert main(argv) == 0
    assert "stopped by data" in capsys.readouterr().out
    training = json.loads((out / "lens.json").read_text())["training"]
    assert training["warm_start_stop"] == "data" and training["lens_device"] == "cpu"
    assert training["steps"] == 0 and training["warm_start_tokens"] == 2 * 16  # 3 rows: 1 batch
    code = main([*argv[:-1], "nonsense"])
    assert code == 2 and "lens_device" in capsys.readouterr().err
