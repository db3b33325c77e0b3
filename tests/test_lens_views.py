"""Lens grids (HTML, PNG), the report and the logit-lens command line, on tiny models."""

from __future__ import annotations

import html

import pytest

import tl_lenses as tll
from tl_lenses import cli
from tl_lenses.readout.view import grid_cells, settle_layer, write_report
from tl_lenses.tiny import tiny_default
from tl_lenses.viz.html import show_token


@pytest.fixture(scope="module")
def result():
    return tll.logit_lens(tiny_default("gpt2"), "hello world", k=3, target="next")


def test_grid_cells_put_the_last_layer_on_top(result):
    values, text, tips, rows, cols = grid_cells(result, "prob", 0, "top1")
    assert rows == result.labels[::-1]
    assert cols == [show_token(t) for t in result.str_tokens[0]]
    top = result.top_tokens(0)
    for row, layer in enumerate(reversed(range(len(rows)))):
        assert text[row] == [show_token(top[layer][p][0]) for p in range(len(cols))]
        assert values[row] == pytest.approx(result.top_probs[layer, 0, :, 0].tolist())
    assert all(show_token(top[-1][0][k]) in tips[0][0] for k in range(3))


def test_rank_grid_shows_the_ranks(result):
    _, text, _, _, _ = grid_cells(result, "rank", 0, "value")
    ranks = result.target_rank[:, 0].flip(0)
    for row in range(len(text)):
        for pos, cell in enumerate(text[row]):
            assert cell == ("" if ranks[row, pos] < 0 else str(int(ranks[row, pos])))


def test_html_is_self_contained(result, tmp_path):
    page = write_report(tmp_path / "r.html", [result, result], title="t").read_text()
    assert "unpkg.com" not in page and "<script src=" not in page
    assert html.escape(show_token(result.top_tokens()[-1][0][0]), quote=True) in page
    assert page.count("<table class='grid'>") == 6  # three grids for each of two results


def test_png_is_written(result, tmp_path):
    path = tmp_path / "grid.png"
    result.save_png(path, statistic="kl")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settle_layer_is_first_row_of_a_final_run_of_rank_one(result):
    settle = settle_layer(result)
    ranks = result.target_rank[:, 0]
    for pos in range(ranks.shape[1]):
        s = int(settle[pos])
        assert all(ranks[l, pos] == 1 for l in range(s, ranks.shape[0]))
        assert s == 0 or ranks[s - 1, pos] != 1


def test_view_arguments_are_checked(result):
    with pytest.raises(ValueError, match="statistic"):
        grid_cells(result, "nope", 0, "top1")
    with pytest.raises(ValueError, match="batch"):
        grid_cells(result, "prob", 5, "top1")
    with pytest.raises(ValueError, match="text"):
        grid_cells(result, "prob", 0, "words")
    no_target = tll.logit_lens(tiny_default("gpt2"), "hi", target=None)
    with pytest.raises(ValueError, match="target"):
        no_target.statistic("rank")


def test_command_line_writes_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tl_lenses.models.load_default_model",
                        lambda backend="hooked": tiny_default("llama-gqa"))
    out, png = tmp_path / "r.html", tmp_path / "r.png"
    code = cli.main(["logit-lens", "hello", "--out", str(out), "--png", str(png),
                     "--statistic", "rank", "--target", "next"])
    assert code == 0 and out.exists() and png.exists()
    assert cli.main(["logit-lens", "hello", "--statistic", "loss"]) == 2
    assert "--statistic must be one of" in capsys.readouterr().err


def test_command_line_target_id_reads_that_token(tmp_path, monkeypatch):
    model = tiny_default("llama-gqa")
    monkeypatch.setattr("tl_lenses.models.load_default_model", lambda backend="hooked": model)
    seen = []
    real = tll.lenses.logit.logit_lens
    monkeypatch.setattr(tll.lenses.logit, "logit_lens",
                        lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    out = tmp_path / "r.html"
    assert cli.main(["logit-lens", "hello", "--out", str(out), "--target-id", "7"]) == 0
    expected = tll.logit_lens(model, "hello", target=7)
    assert seen[0].target_rank.equal(expected.target_rank)
    assert (seen[0].target_ids == 7).all()
    with pytest.raises(SystemExit):  # argparse: not allowed with --target
        cli.main(["logit-lens", "hello", "--target", "next", "--target-id", "7"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_shorter_prompt_of_a_padded_batch_draws_only_its_own_positions(side, tmp_path):
    model = tiny_default("gpt2", n_ctx=64)
    result = tll.logit_lens(model, ["hi", "hello world"], padding_side=side)
    for batch in (0, 1):
        values, text, _, rows, cols = grid_cells(result, "prob", batch, "top1")
        n_real = int(result.mask[batch].sum())
        assert len(cols) == n_real and cols == [show_token(t) for t in
                                                result.str_tokens_at(batch)[:n_real]]
        assert all(len(row) == n_real for row in values + text)
    # the full width stays reachable explicitly
    assert len(grid_cells(result, "prob", 0, "top1", columns=range(11))[4]) == 11
    assert result.save_png(tmp_path / "short.png", batch=0).stat().st_size > 0
