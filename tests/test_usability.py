"""A fresh user's mistakes: each is refused before any work, naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

import tl_lenses as tll
from tests.conftest import assert_no_hooks
from tl_lenses.patchscopes import presets
from tl_lenses.tiny import tiny_bridge, tiny_hooked
from tl_lenses.viz.notebook import NotebookView


def _small_ctx(arch: str, backend: str):
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch, n_ctx=32)


@pytest.fixture(params=[pytest.param(("llama-gqa", "hooked"), marks=pytest.mark.hooked),
                        pytest.param(("gpt2", "hooked"), marks=pytest.mark.hooked),
                        ("llama-gqa", "bridge"), ("gpt2", "bridge")],
                ids=lambda p: "-".join(p))
def short_model(request):
    """A tiny model whose n_ctx (32) a generation can run past."""
    return _small_ctx(*request.param)


def test_generation_past_n_ctx_is_refused_on_every_path(short_model):
    model = short_model
    target = "cat -> cat; x"
    n = model.to_tokens(target).shape[1]
    fits = model.cfg.n_ctx - n + 1
    calls = [
        lambda m: tll.patchscope(model, "hello world", target, source_layer=1,
                                 max_new_tokens=m),
        lambda m: tll.patchscope_sweep(model, "hello world", target, source_layers=[1],
                                       max_new_tokens=m),
        lambda m: presets.entity_description(model, "hello world", layers=[1],
                                             target_prompt=target, max_new_tokens=m),
        lambda m: presets.chain_of_thought(model, target, "hello", source_layers=[1],
                                           target_layers=[1], max_new_tokens=m),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"max_new_tokens={fits + 1}.*{n} tokens.*"
                                             rf"n_ctx={model.cfg.n_ctx}"):
            call(fits + 1)
        assert_no_hooks(model)
    # The longest generation that fits runs, and fills the context exactly.
    result = tll.patchscope(model, "hello world", target, source_layer=1, max_new_tokens=fits)
    assert result.generated_ids.shape == (fits,)


def _public_result_classes():
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import tl_lenses

    found = {}
    for info in pkgutil.walk_packages(tl_lenses.__path__, "tl_lenses."):
        if "._" in info.name or info.name.endswith(("cli", "__main__")):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and not name.startswith("_") \
                    and dataclasses.is_dataclass(cls) and hasattr(cls, "to_html"):
                found[f"{info.name}.{name}"] = cls
    return found


def test_every_public_result_class_displays_itself_in_a_notebook():
    classes = _public_result_classes()
    assert {"AlignmentResult", "CausalResult", "CurrentNextResult", "DriftResult",
            "LRECausalityResult", "ObjectivesResult", "RetrainedResult", "DLAResult",
            "SweepResult"} <= {name.rsplit(".", 1)[1] for name in classes}
    missing = [name for name, cls in classes.items()
               if not issubclass(cls, NotebookView) or cls._view_html is NotebookView._view_html]
    assert not missing


def test_analysis_results_render_inline_and_current_next_says_never(tiny_model):
    from tl_lenses import analysis

    tokens = tiny_model.to_tokens(["the cat sat on the mat", "a dog ran in the park"])
    result = analysis.current_vs_next(tiny_model, tokens, {"logit": tll.LogitLens()},
                                      progress=False)
    html = result._repr_html_()
    assert html.startswith("<div class='tll'")
    assert "from layer None" not in html and "nan" not in html.split("</style>", 1)[1]
    if result.crossover("logit") is None:
        assert "token never" in html
    empty = [g for g, n in result.counts.items() if n == 0]
    assert ("no tokens" in html) == bool(empty)


def test_head_path_repr_is_short_and_names_the_top_paths(tiny_model):
    paths = tll.head_path_dla(tiny_model, "the cat sat", [1, 2])
    text = repr(paths)
    assert len(text) < 600 and "tensor(" not in text
    assert str(tuple(paths.values.shape)) in text
    assert paths.top(1).items()[0][0] in text


@pytest.fixture(params=[pytest.param("hooked", marks=pytest.mark.hooked), "bridge"])
def long_model(request):
    """A tiny llama with room (n_ctx 256) for few-shot relation prompts in bytes."""
    return (tiny_hooked if request.param == "hooked" else tiny_bridge)("llama-gqa", n_ctx=256)


def test_a_relation_name_works_wherever_a_relation_does(long_model, tmp_path):
    import json

    from tl_lenses import analysis
    from tl_lenses.lenses.attribute import metrics
    from tl_lenses.lenses.attribute.relations import Relation, Sample, get_relation

    model = long_model
    swept = metrics.sweep(model, "country_capital", [1], n=4)
    assert [lre.relation for lre in swept.lres] == [get_relation("country_capital").name]
    # A random model knows no capitals: by name and by object it fails the same way,
    # past the relation's resolution (the split ran).
    for relation in ("country_capital", get_relation("country_capital")):
        with pytest.raises(ValueError, match="too few held-out subjects of 'country capital"):
            analysis.lre_causality(model, relation, 1, n=4, ranks=[2, 8])
    # A relation file by path gives what the Relation object gives.
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"
    pairs = list(zip(letters[:30], letters[10:40]))
    relation = Relation("at end", ("{}",), tuple(Sample(s, o) for s, o in pairs))
    path = tmp_path / "at_end.json"
    path.write_text(json.dumps({"name": "at end", "prompt_templates": ["{}"], "samples": [
        {"subject": s, "object": o} for s, o in pairs]}))
    by_path = analysis.lre_causality(model, str(path), 1, n=4, ranks=[2, 8], own_answers=True)
    by_object = analysis.lre_causality(model, relation, 1, n=4, ranks=[2, 8], own_answers=True)
    assert by_path.test == by_object.test and by_path.validation == by_object.validation
    with pytest.raises(TypeError, match="relation must be a Relation"):
        get_relation(3)
    with pytest.raises(ValueError, match="relation must be a starter name"):
        analysis.lre_causality(model, "no_such_relation", 1)


def test_lre_causality_default_ranks_fit_d_model(tiny_model):
    from tl_lenses.analysis.causal_lre import check_ranks

    d = tiny_model.cfg.d_model
    assert check_ranks(None, d) == [r for r in (2, 4, 8, 16, 32, 64, 128, 256) if r <= d]
    for bad in ([], [0], [d + 1], "8", [2.5]):
        with pytest.raises(ValueError, match="ranks must be"):
            check_ranks(bad, d)


def _letters_relation(path):
    import json

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"
    path.write_text(json.dumps({"name": "at end", "prompt_templates": ["{}"], "samples": [
        {"subject": s, "object": o} for s, o in zip(letters[:30], letters[10:40])]}))
    return str(path)


@pytest.mark.parametrize("flags, named", [
    (["--ranks", "2,64"], "--ranks"),                       # 64 > d_model = 32
    (["--ranks", "0"], "--ranks"),
    (["--lre-layer", "9"], "--lre-layer"),                  # the tiny model has 3 layers
    (["--relation", "no_such_relation"], "--relation"),
])
def test_analyze_causal_checks_the_lre_settings_before_writing(flags, named, capsys, tmp_path):
    from tl_lenses.cli import main

    out = tmp_path / "r.html"
    argv = ["analyze", "causal", "--model", "tiny-llama", "--generate", "4", "--seq-len", "16",
            "--out", str(out), *flags]
    if "--relation" not in flags:
        argv += ["--relation", _letters_relation(tmp_path / "rel.json")]
    assert main(argv) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_analyze_causal_puts_the_lre_table_in_the_report(capsys, tmp_path):
    from tl_lenses.cli import main

    out = tmp_path / "r.html"
    code = main(["analyze", "causal", "--model", "tiny-llama", "--backend", "bridge",
                 "--device", "cpu", "--dtype", "float32", "--generate", "4", "--seq-len", "16",
                 "--rows", "2", "--relation", _letters_relation(tmp_path / "rel.json"),
                 "--own-answers", "--out", str(out)])
    assert code == 0
    html = out.read_text()
    # Default ranks fit d_model = 32; the default layer fits the 3-layer model.
    assert "LRE causality" in html and "at end, layer 1" in html
    header = html[html.index("validation causality by rank"):]
    assert all(f"<th>{r}</th>" in header for r in (2, 4, 8, 16, 32))
    assert "<th>64</th>" not in header
    assert "jacobian" in capsys.readouterr().out


def _refused(call, error, match, model):
    with pytest.raises(error, match=match):
        call()
    assert_no_hooks(model)


def test_bad_arguments_are_refused_naming_them(tiny_model):
    from tl_lenses import analysis

    m, prompt, directions = tiny_model, "the cat sat", [1, 2]
    # Under the tests' runtime type check a wrong type may be caught (a TypeError naming
    # the parameter) before the function's own check: accept either wording.
    param = r"(parameter '{0}'|{0} must)"
    _refused(lambda: tll.patchscope_sweep(m, "hello", "cat x", batch_size=0), ValueError,
             "batch_size must be an int >= 1", m)
    for positions in (1.0, "last", [0, 1.5]):
        _refused(lambda: tll.dla(m, prompt, directions, positions=positions),
                 (TypeError, ValueError), param.format("positions"), m)
    _refused(lambda: tll.head_path_dla(m, prompt, directions, position=99), ValueError,
             r"^position must", m)
    _refused(lambda: tll.dla(m, prompt, directions, neurons="yes"), TypeError,
             param.format("neurons"), m)
    _refused(lambda: tll.logit_lens(m, prompt, layers=1), TypeError,
             param.format("layers"), m)
    _refused(lambda: analysis.current_vs_next(m, m.to_tokens(["ab cd ef"]), [tll.LogitLens()],
                                              progress=False),
             TypeError, param.format("lenses"), m)
    _refused(lambda: presets.chain_of_thought(m, inner="", source_layers=[1]), ValueError,
             "inner must be a non-empty string", m)
    result = tll.dla(m, prompt, directions)
    for key in (3.5, [0, 2.5], None):
        with pytest.raises(TypeError, match="a DLAResult is indexed by"):
            result[key]
    assert result[[0, "b_U"]].labels == [result.labels[0], "b_U"]


def test_layer_grid_refuses_a_missing_source_and_values_of_the_wrong_length(tiny_model):
    sweep = tll.patchscope_sweep(tiny_model, "hello", "cat x", source_layers=[0, 1],
                                 pairs="same")
    values = list(range(len(sweep)))
    grid, rows, cols = sweep.layer_grid(values)
    assert [grid[i][i] for i in range(2)] == values and rows == cols == [0, 1]
    with pytest.raises(ValueError, match=r"source_index must be one of .*\[0\], got 5"):
        sweep.layer_grid(values, source_index=5)
    with pytest.raises(ValueError, match=rf"one value per case \({len(sweep)}\), got 1"):
        sweep.layer_grid([1])


def test_residual_drift_refuses_one_row_minibatches_and_names_the_offset_given(tiny_model):
    from tl_lenses import analysis

    rows = tiny_model.to_tokens(["the cat sat on the mat", "a dog ran in the park"])
    with pytest.raises(ValueError, match="cka_rows must be >= 2.*got 1"):
        analysis.residual_drift(tiny_model, rows, cka_rows=1, progress=False)
    with pytest.raises(ValueError, match="max_offset must be None or an int >= 0, got -5"):
        analysis.residual_drift(tiny_model, rows, max_offset=-5, progress=False)
    # Two rows per minibatch is the least with a defined CKA: the diagonal is exactly 1.
    result = analysis.residual_drift(tiny_model, rows, cka_rows=2, progress=False)
    assert torch.allclose(result.cka.diagonal(), torch.ones(len(result.hook_names)))


def test_collector_result_before_a_run_says_to_run_its_hooks(tiny_model):
    from tl_lenses.readout.apply import LensCollector

    collector = LensCollector(tiny_model)
    tokens = tiny_model.to_tokens("the cat")
    with pytest.raises(ValueError, match=r"fwd_hooks=collector\.fwd_hooks\(\)"):
        collector.result(tokens)
    tiny_model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())
    expected = tll.logit_lens(tiny_model, tokens)
    assert torch.equal(collector.result(tokens).top_ids, expected.top_ids)


def test_cli_errors_name_the_flags_not_the_python_arguments(capsys, tmp_path):
    from tl_lenses.cli import as_flags, main

    out = tmp_path / "p.html"
    assert main(["patchscope", "sweep", "hello", "--layers", "9", "--model", "tiny-llama",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--layers must be" in err and "source_layers" not in err and not out.exists()
    assert main(["dla", "ab cd", "--answer", "ab", "--model", "tiny-llama",
                 "--out", str(tmp_path / "d.html")]) == 2
    assert "error: --answer 'ab' is 2 tokens" in capsys.readouterr().err
    # Prose holding the word is left alone; a clause that starts with it is mapped.
    names = {"answer": "--answer"}
    assert as_flags("the answer is", names) == "the answer is"
    assert as_flags("x; answer must be one token", names) == "x; --answer must be one token"


def test_tl4_refusal_of_hooked_names_what_was_asked(monkeypatch):
    from tl_lenses import _compat

    monkeypatch.setattr(_compat, "HAS_HOOKED", False)
    with pytest.raises(NotImplementedError) as info:
        _compat.hooked_classes()
    message = str(info.value)
    assert message.startswith("backend='hooked'") and "needs HookedTransformer" not in message
    assert "backend='bridge'" in message


def test_load_lre_takes_the_folder_or_its_config_file(tmp_path):
    from tl_lenses.lenses.attribute import LRE, load_lre, save_lre
    from tl_lenses.tiny import tiny_default

    model = tiny_default("llama-gqa")
    lre = LRE.identity(model.cfg.d_model, layer=1, relation="r", template="{}")
    folder = save_lre(lre, tmp_path / "lre_a", model)
    by_file = load_lre(folder / "lre.json", model)
    assert torch.equal(by_file.weight, load_lre(folder, model).weight)
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file: give the .* folder"):
        load_lre(stray, model)
    # Both models are built in memory (named 'external'): the message shows what differs.
    other = tiny_default("gpt2")
    with pytest.raises(ValueError, match="different model") as info:
        load_lre(folder, other)
    assert "'external' vs 'external'" not in str(info.value)


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_tl_lenses_name_in_the_docs_imports():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    broken = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        names = set(re.findall(r"\btl_lenses(?:\.[A-Za-z_]\w*)+", text))
        for module, imported in re.findall(r"^\s*from (tl_lenses[\w.]*) import ([\w, ]+)$",
                                           text, flags=re.M):
            names |= {f"{module}.{n.split(' as ')[0].strip()}" for n in imported.split(",")}
        broken += [f"{doc.name}: {name}" for name in sorted(names) if not _resolves(name)]
        # Paths inside the package (a cache folder under ~/.cache is not one).
        for path in set(re.findall(r"(?<![~/.\w])tl_lenses/[\w/.]*\w", text)):
            if not (root / path).exists():
                broken.append(f"{doc.name}: {path}")
    assert not broken


# --- a fresh user's inputs: what the cache needs, an LRE for a lens, int-like values ---------


def test_a_cache_without_its_input_says_the_input_is_required(tiny_model):
    tokens = tiny_model.to_tokens("the cat sat", prepend_bos=False)
    _, cache = tiny_model.run_with_cache(tokens)
    for call in (lambda: tll.dla(tiny_model, None, [1, 2], cache=cache),
                 lambda: tll.head_path_dla(tiny_model, None, [1, 2], heads=["L1H0"],
                                           cache=cache)):
        _refused(call, TypeError, r"input is required with cache=.*tokens .*the cache was "
                 "taken on", tiny_model)
    # and what it says to do works
    assert tll.dla(tiny_model, tokens, [1, 2], cache=cache).logits.shape == (1, 1, 2)


def test_an_lre_where_a_lens_belongs_points_at_the_attribute_lens(tiny_model):
    from tl_lenses.readout.fingerprint import check_lens

    # (the shared check every lens entry point calls; under the tests' runtime type check
    # apply_lens's annotation refuses the LRE first)
    lre = tll.LRE.identity(tiny_model.cfg.d_model)
    with pytest.raises(TypeError, match=r"got LRE; .*AttributeLens\(lre\).*attribute_lens"):
        check_lens(tiny_model, lre)
    wrapped = tll.apply_lens(tiny_model, "ab cd", tll.attribute.AttributeLens(lre))
    assert torch.equal(wrapped.top_ids, tll.logit_lens(tiny_model, "ab cd").top_ids)


def test_a_tuned_lens_of_some_layers_reads_its_own_rows_by_default(tiny_model):
    """apply_lens and evaluate_lenses default to the rows the lens covers (one function)."""
    from tl_lenses.readout.apply import lens_rows

    lens = tll.TunedLens.for_model(tiny_model, layers=[1])
    with torch.no_grad():
        lens.bias.normal_(generator=torch.manual_seed(0))
    rows = lens_rows(tiny_model, lens)
    assert rows == ["blocks.1.hook_resid_pre", f"blocks.{tiny_model.cfg.n_layers - 1}"
                                               ".hook_resid_post"]
    default = tll.apply_lens(tiny_model, "ab cd", lens)
    named = tll.apply_lens(tiny_model, "ab cd", lens, hook_names=rows)
    assert default.hook_names == rows
    assert torch.equal(default.top_ids, named.top_ids)
    assert torch.equal(default.top_probs, named.top_probs)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.manual_seed(1))
    assert tll.evaluate_lenses(tiny_model, tokens, {"t": lens}).labels == default.labels
    # rows it does not cover are still refused, naming what it covers
    _refused(lambda: tll.apply_lens(tiny_model, "ab cd", lens, layers=[0]), ValueError,
             r"no translator.*covers \['blocks\.1\.hook_resid_pre'\]", tiny_model)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_token_ids_of_any_integer_dtype_read_as_the_same_ids(tiny_model, dtype):
    tokens = torch.randint(1, 100, (2, 6), generator=torch.manual_seed(0))
    expected = tll.logit_lens(tiny_model, tokens)
    result = tll.logit_lens(tiny_model, tokens.to(dtype))
    assert result.tokens.dtype == torch.long and torch.equal(result.tokens, expected.tokens)
    assert torch.equal(result.top_probs, expected.top_probs)
    _refused(lambda: tll.logit_lens(tiny_model, tokens.bool()), ValueError,
             r"int token ids .*got dtype torch\.bool", tiny_model)


def test_integer_like_values_are_taken_wherever_ints_are(tiny_model):
    """numpy integers and 0-d int tensors index like the ints they hold; bools never do."""
    import numpy as np

    m, text = tiny_model, "abcdef"
    lens = tll.logit_lens(m, text, positions=[0, 1], layers=[1], target=5)
    for positions in ([np.int64(0), np.int64(1)], list(np.arange(2)),
                      [torch.tensor(0), np.int32(1)]):
        again = tll.logit_lens(m, text, positions=positions, layers=[np.int64(1)],
                               target=np.int64(5))
        assert again.positions == [0, 1] and torch.equal(again.top_probs, lens.top_probs)
        assert torch.equal(again.target_ids, lens.target_ids)
    assert tll.logit_lens(m, text, positions=torch.tensor(1), target=torch.tensor(5)) \
        .positions == [1]
    one = tll.dla(m, text, [1, 2], positions=1)
    for position in (np.int64(1), torch.tensor(1)):
        assert torch.equal(tll.dla(m, text, [1, 2], positions=position).logits, one.logits)
    path = tll.head_path_dla(m, text, [1, 2], heads=[(1, 0)], position=-1)
    again = tll.head_path_dla(m, text, [1, 2], heads=[(np.int64(1), torch.tensor(0))],
                              position=np.int64(-1))
    assert again.heads == path.heads and torch.equal(again.values, path.values)
    scope = tll.patchscope(m, "ab", "ab", source_layer=1, source_position=-1)
    again = tll.patchscope(m, "ab", "ab", source_layer=np.int64(1),
                           source_position=torch.tensor(-1))
    assert again.source_layer == 1 and torch.equal(again.logits, scope.logits)
    assert tll.TunedLens.for_model(m, layers=np.int64(1)).hook_names == \
        tll.TunedLens.for_model(m, layers=[1]).hook_names
    # a bool is a mistake, not 0 or 1
    param = r"(parameter '{0}'|{0}\b)"
    for call, name in [(lambda: tll.logit_lens(m, text, positions=True), "positions"),
                       (lambda: tll.logit_lens(m, text, positions=[np.True_]), "positions"),
                       (lambda: tll.logit_lens(m, text, layers=[True]), "layers"),
                       (lambda: tll.logit_lens(m, text, target=True), "target"),
                       (lambda: tll.patchscope(m, "ab", "ab", source_layer=True), "source_layer"),
                       (lambda: tll.head_path_dla(m, text, [1, 2], heads=[(True, 0)]), "heads")]:
        _refused(call, (TypeError, ValueError), param.format(name), m)


@pytest.mark.parametrize("backend", [pytest.param("hooked", marks=pytest.mark.hooked), "bridge"])
def test_lre_prompts_longer_than_n_ctx_name_n_and_the_largest_that_fits(backend):
    from tl_lenses.lenses.attribute.lre import _check_prompts_fit
    from tl_lenses.lenses.attribute.relations import Relation, Sample

    model = _small_ctx("llama-gqa", backend)
    relation = Relation("toy", ("The {} is",), tuple(
        Sample(s, o) for s, o in zip(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"],
                                     ["one", "two", "three", "four", "five", "six"])))
    with pytest.raises(ValueError, match=r"few-shot prompts of n=4 training examples .* "
                                         r"n_ctx=32; pass a smaller n \(n=(\d+) fits\)") as err:
        tll.estimate_lre(model, relation, layer=1, n=4)
    fits = int(re.search(r"n=(\d+) fits", str(err.value)).group(1))
    # the n it names fits and the next one does not
    train = relation.split(4, seed=0)[0]
    _check_prompts_fit(model, relation.prompt_templates[0], train[:fits])
    with pytest.raises(ValueError, match="n_ctx=32"):
        _check_prompts_fit(model, relation.prompt_templates[0], train[:fits + 1])
    assert tll.estimate_lre(model, relation, layer=1, n=fits).weight.shape == (32, 32)


def test_an_unknown_training_option_is_a_value_error_naming_it(tiny_model):
    tokens = torch.randint(0, 256, (4, 8), generator=torch.manual_seed(0))
    _refused(lambda: tll.train_tuned_lens(tiny_model, tokens, stepz=1), ValueError,
             r"unknown training option\(s\) \['stepz'\].*did you mean 'steps'", tiny_model)


def test_rows_longer_than_n_ctx_are_refused_where_they_are_made(short_model):
    from tl_lenses.streams import TokenStream

    model, text = short_model, ["abcdefgh " * 40]
    for call in (lambda: tll.token_split(model, texts=text, seq_len=64),
                 lambda: tll.token_split(model, generate=2, seq_len=64),
                 lambda: TokenStream(model, texts=text, seq_len=64)):
        _refused(call, ValueError, r"seq_len=64 is longer than the model's n_ctx=32", model)
    split = tll.token_split(model, texts=text, seq_len=32, held_out=0.25)
    assert split.train.shape[1] == 32
    # rows made elsewhere are refused by training naming seq_len and n_ctx
    _refused(lambda: tll.train_tuned_lens(model, torch.cat([split.train] * 2, 1), steps=1),
             ValueError, r"64 tokens long, more than the model's n_ctx=32: pack them with "
             r"seq_len <= 32", model)
