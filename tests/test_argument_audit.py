"""Arguments are never silently ignored or out of range: tuned-lens training and files, LRE
estimation, the command lines.

Each bad input raises a ValueError/TypeError naming the argument, and nothing is mutated
(the lens, the tokens, the files on disk).

Tuned-lens training is being reorganised (issue 18), so its checks live in
``tl_lenses/lenses/tuned/checks.py`` (tested directly here) and are wired into
``train_tuned_lens`` by one call; the tests through ``train_tuned_lens`` and the
``train-tuned`` command are strict expected failures until that call is in ``train.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

import tl_lenses as tll
from tl_lenses._compat import HAS_HOOKED
from tl_lenses.cli import main
from tl_lenses.lenses.attribute import LRE
from tl_lenses.lenses.attribute.io import load_lre, save_lre
from tl_lenses.lenses.attribute.lre import estimate_lre
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.lenses.tuned import TrainConfig, load_tuned_lens, save_tuned_lens
from tl_lenses.lenses.tuned.checks import check_training
from tl_lenses.lenses.tuned.eval import evaluate_lenses
from tl_lenses.lenses.tuned.io import import_tuned_lens_library
from tl_lenses.model_args import model_from_args
from tl_lenses.tiny import tiny_bridge, tiny_hooked

TOY = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in zip("abcdefghijkl",
                                                                   "mnopqrstuvwx")))
# (TrainConfig field overrides, the argument the error must name)
BAD_CONFIGS = [
    ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"steps": True}, "steps"),
    ({"time_budget": -1.0}, "time_budget"), ({"time_budget": 0}, "time_budget"),
    ({"time_budget": "60"}, "time_budget"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -1}, "batch_size"), ({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"),
    ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"clip": -1.0}, "clip"),
    ({"bf16": "yes"}, "bf16"), ({"ls_tokens": -1}, "ls_tokens"),
    ({"ls_time_fraction": 2.0}, "ls_time_fraction"), ({"ls_time_fraction": 0}, "ls_time_fraction"),
    ({"ridge": -1.0}, "ridge"), ({"max_chunk_elements": 0}, "max_chunk_elements"),
    ({"seed": "a"}, "seed"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"progress": "no"}, "progress"), ({"recipe": "slow"}, "recipe"),
]


@pytest.fixture(scope="module")
def model():
    return (tiny_hooked if HAS_HOOKED else tiny_bridge)("gpt2")


@pytest.fixture(scope="module")
def rows(model):
    return torch.randint(0, model.cfg.d_vocab, (8, 8), generator=torch.manual_seed(0))


# --- tuned-lens training: the checks ---------------------------------------------------------

@pytest.mark.parametrize("fields, argument", BAD_CONFIGS)
def test_training_config_fields_are_checked(model, rows, fields, argument):
    config = TrainConfig(progress=False).resolved("cpu")
    for name, value in fields.items():   # set after __init__: the test run type-checks it
        setattr(config, name, value)
    with pytest.raises((ValueError, TypeError), match=argument):
        check_training(model, rows, None, config)


def test_training_inputs_are_checked(model, rows, tmp_path):
    config = TrainConfig(progress=False).resolved("cpu")
    before = rows.clone()
    for tokens in (torch.full((2, 8), model.cfg.d_vocab), torch.full((2, 8), -1),
                   torch.ones(2, 8, dtype=torch.bool), rows.float(), rows[0]):
        with pytest.raises(ValueError, match="tokens"):
            check_training(model, tokens, None, config)
    with pytest.raises(ValueError, match="resume"):
        check_training(model, rows, None, config, resume=True)
    with pytest.raises(TypeError, match="resume"):
        check_training(model, rows, None, config, resume="yes")
    with pytest.raises(TypeError, match="callback"):
        check_training(model, rows, None, config, callback=3)
    with pytest.raises(TypeError, match="lens"):
        check_training(model, rows, "lens", config)
    narrow = tll.TunedLens(["blocks.0.hook_resid_pre"], model.cfg.d_model + 1,
                           final_name="blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="d_model"):
        check_training(model, rows, narrow, config)
    alien = tll.TunedLens.for_model(model)
    alien.model_info["unembed_sha256"], alien.model_info["probe"] = "0", [0.0]
    with pytest.raises(ValueError, match="different model"):
        check_training(model, rows, alien, config)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        check_training(model, rows, None, replace(config, checkpoint_dir=str(tmp_path / "file")))
    assert torch.equal(rows, before)
    check_training(model, rows, tll.TunedLens.for_model(model), config)   # good input passes


@pytest.mark.parametrize("fields, argument", [
    ({"steps": -1}, "steps"), ({"batch_size": 0}, "batch_size"),
    ({"time_budget": -1.0}, "time_budget"), ({"resume": True}, "resume"),
    ({"ls_time_fraction": 2.0}, "ls_time_fraction"),
])
def test_train_tuned_lens_checks_its_arguments(model, rows, fields, argument):
    lens = tll.TunedLens.for_model(model)
    before = {name: p.detach().clone() for name, p in lens.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=argument):
        tll.train_tuned_lens(model, rows, lens, **{"steps": 1, "batch_size": 4,
                                                   "progress": False, **fields})
    assert all(torch.equal(p, before[name]) for name, p in lens.named_parameters())


def test_train_tuned_lens_checks_token_ids(model):
    with pytest.raises(ValueError, match="tokens"):
        tll.train_tuned_lens(model, torch.full((4, 8), -1), steps=1, progress=False)


# --- tuned-lens and LRE files ------------------------------------------------------------------

def test_lens_and_lre_paths_and_formats(model, tmp_path):
    lens = tll.TunedLens.for_model(model)
    for bad in (None, 3, ""):
        with pytest.raises(TypeError, match="path"):
            load_tuned_lens(bad, model)
        with pytest.raises(TypeError, match="path"):
            save_tuned_lens(lens, bad)
        with pytest.raises(TypeError, match="path"):
            load_lre(bad, model)
        with pytest.raises(TypeError, match="path"):
            import_tuned_lens_library(bad, model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path"):
        save_tuned_lens(lens, tmp_path / "file")
    with pytest.raises(ValueError, match="path"):
        save_lre(LRE.identity(model.cfg.d_model), tmp_path / "file", model)
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(TypeError, match="training"):
        save_tuned_lens(lens, tmp_path / "a", training="notes")
    with pytest.raises(TypeError, match="training"):
        save_tuned_lens(lens, tmp_path / "b", training={"when": object()})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # one format is not read as the other
    save_tuned_lens(lens, tmp_path / "lens")
    save_lre(LRE.identity(model.cfg.d_model), tmp_path / "lre", model)
    with pytest.raises(FileNotFoundError, match="tl_lenses.lre"):
        load_lre(tmp_path / "lens", model)
    with pytest.raises(FileNotFoundError, match="tl_lenses.tuned_lens"):
        load_tuned_lens(tmp_path / "lre", model)


def test_evaluation_arguments(model, rows):
    for kwargs, argument in [({"batch_size": 0}, "batch_size"), ({"batch_size": 1.5},
                             "batch_size"), ({"progress": "yes"}, "progress")]:
        with pytest.raises((ValueError, TypeError), match=argument):
            evaluate_lenses(model, rows, **kwargs)


# --- LRE estimation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, argument", [
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": "1"}, TypeError, "beta"),
    ({"beta": True}, TypeError, "beta"),
    ({"seed": "a"}, TypeError, "seed"),
    ({"progress": "yes"}, TypeError, "progress"),
    ({"train": [Sample("a", "m")], "n": 3}, ValueError, "n="),
    ({"train": []}, ValueError, "train"),
    ({"n": True}, ValueError, "n must"),
    ({"rank": 0}, ValueError, "rank"),
    ({"template": 1}, ValueError, "template"),
    ({"method": "jvp"}, ValueError, "method"),
])
def test_lre_estimation_arguments(model, kwargs, error, argument):
    kwargs = {"n": 2, **kwargs} if "train" not in kwargs else kwargs
    with pytest.raises(error, match=argument):
        estimate_lre(model, TOY, 1, **kwargs)


def test_lre_relation_by_name_or_rejected(model):
    with pytest.raises(TypeError, match="relation"):
        estimate_lre(model, 42, 1, n=1)
    with pytest.raises(ValueError, match="relation"):
        estimate_lre(model, "no_such_relation", 1, n=1)
    named = estimate_lre(model, "country_capital", 1, n=1)
    assert named.relation == tll.attribute.get_relation("country_capital").name
    train = [Sample("a", "m"), Sample("bc", "n")]
    assert estimate_lre(model, TOY, 1, train=train, n=2).n == 2        # n agreeing is fine


# --- command lines -------------------------------------------------------------------------------

def _run(argv, capsys) -> tuple[int, str]:
    code = main([*argv, "--backend", "hooked" if HAS_HOOKED else "bridge"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("preset, flags, named", [
    ("identity", ["--target-layers", "1"], "--target-layers"),
    ("identity", ["--max-new-tokens", "3"], "--max-new-tokens"),
    ("identity", ["--position", "0"], "--position"),
    ("sweep", ["--inner", "the inner phrase"], "--inner"),
    ("describe", ["--png", "x.png"], "--png"),
    ("cot", ["--placeholder", "?"], "--placeholder"),
])
def test_patchscope_command_rejects_options_its_preset_ignores(preset, flags, named, capsys,
                                                               tmp_path):
    out = tmp_path / "p.html"
    code, err = _run(["patchscope", preset, "ab cd", "--model", "tiny-gpt2", *flags,
                      "--out", str(out)], capsys)
    assert code == 2 and named in err and "does not use" in err
    assert not out.exists()


def test_patchscope_command_keeps_a_zero(capsys, tmp_path):
    """--max-new-tokens 0 is a value: describe needs >= 1 and says so (not silently 20)."""
    code, err = _run(["patchscope", "describe", "ab cd", "--model", "tiny-gpt2", "--target",
                      "ab: x", "--max-new-tokens", "0", "--out", str(tmp_path / "d.html")],
                     capsys)
    assert code == 2 and "--max-new-tokens" in err


@pytest.mark.parametrize("argv, named", [
    (["logit-lens", "ab cd", "--k", "0"], "k must"),
    (["logit-lens", "ab cd", "--target", "abc"], "target"),
    (["logit-lens", "ab cd", "--statistic", "size"], "--statistic"),
    (["logit-lens", "ab cd", "--statistic", "rank"], "give --png"),
    (["logit-lens", "ab cd", "--target-id", "999999"], "target id 999999"),
    (["dla", "ab cd", "--answer", "a", "--position", "9"], "--position"),
    (["dla", "ab cd", "--answer", "ab"], "--answer 'ab'"),
    (["dla", "ab cd", "--answer", "a", "--k", "0"], "--k"),
    (["patchscope", "identity", "ab cd", "--layers", "0,9"], "layers"),
    (["patchscope", "sweep", "ab cd", "--layers", "x"], "--layers"),
    (["attribute-lens", "ab cd", "--relation", "nope"], "relation"),
    (["attribute-lens", "ab cd", "--layer", "9"], "layer"),
    (["attribute-lens", "ab cd", "--layer", "1", "--n", "0"], "n must"),
    (["attribute-lens", "ab cd", "--layer", "1", "--n", "1", "--rank", "0"], "rank"),
])
def test_commands_name_the_bad_argument(argv, named, capsys, tmp_path):
    out = tmp_path / "r.html"
    code, err = _run([*argv, "--model", "tiny-gpt2", "--out", str(out)], capsys)
    assert code == 2 and named in err
    assert not out.exists()


def test_tiny_models_honour_dtype_and_device():
    args = argparse.Namespace(model="tiny-gpt2", backend="hooked" if HAS_HOOKED else "bridge",
                              device="cpu", dtype="float64")
    assert model_from_args(args).W_U.dtype == torch.float64


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "0"], "batch_size"), (["--steps", "-1"], "steps"),
    (["--resume"], "resume"), (["--time-budget", "-5"], "time_budget"),
    (["--ls-tokens", "-3"], "ls_tokens"),
])
def test_train_tuned_command_rejects_bad_settings(flags, named, capsys, tmp_path):
    out = tmp_path / "lens"
    code, err = _run(["train-tuned", "--model", "tiny-gpt2", "--generate", "4", "--seq-len",
                      "16", "--out", str(out), *flags], capsys)
    assert code == 2 and named in err
    assert not out.exists()


# --- tl-lenses analyze -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["objectives", "--steps", "0"], "--steps"),
    (["objectives", "--lr", "-1"], "--lr"),
    (["objectives", "--layers", "1,x"], "--layers"),
    (["drift", "--rows", "0"], "--rows"),
    (["drift", "--seq-len", "-4"], "--seq-len"),
    (["alignment", "--batch-size", "0"], "--batch-size"),
    (["current-next", "--generate", "0"], "--generate"),
])
def test_analyze_command_rejects_out_of_range_numbers(argv, named, capsys, tmp_path):
    """argparse refuses the value and names the flag; no report is written."""
    out = tmp_path / "a.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *argv, "--model", "tiny-llama", "--out", str(out),
              *([] if "--generate" in argv else ["--generate", "4"])])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, named", [
    (["--rank", "4"], "--rank"),                      # top-token intervention has no subspace
    (["--lre-layer", "3"], "--lre-layer"),            # no --relation to estimate
])
def test_analyze_causal_rejects_options_it_would_ignore(flags, named, capsys, tmp_path):
    out = tmp_path / "c.html"
    code = main(["analyze", "causal", "--model", "tiny-llama", "--generate", "4",
                 "--out", str(out), *flags])
    assert code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_dla_top_and_with_attention_check_k(model, k):
    """k of top/with_attention: an int >= 1, named in the error (k=0 rendered nothing).

    A float is a TypeError under the tests' runtime type check, a ValueError without it.
    """
    result = tll.dla(model, "ab cd", ("a", "b"))
    for call in (lambda: result.top(k), lambda: result.with_attention(model, k)):
        if isinstance(k, int):
            with pytest.raises(ValueError, match="k must be an int >= 1"):
                call()
        else:
            with pytest.raises((TypeError, ValueError), match=r"\bk\b"):
                call()
