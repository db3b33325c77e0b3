"""Tuned lenses at scale: N gloo processes == one process, streamed corpora, budget planning."""

from __future__ import annotations

import socket

import pytest
import torch

from tl_lenses import devices
from tl_lenses._compat import DEFAULT_BACKEND
from tl_lenses.data import pack_tokens, read_text_files, tokenize_texts
from tl_lenses.lenses.tuned.budget import Clock
from tl_lenses.lenses.tuned.config import TrainConfig
from tl_lenses.lenses.tuned.distributed import World, close_distributed, init_distributed
from tl_lenses.lenses.tuned.kl import residuals
from tl_lenses.lenses.tuned.least_squares import Moments, regression_pairs
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.train import train_tuned_lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.streams import TensorRows, TokenStream
from tl_lenses.tiny import tiny_bridge, tiny_default, tiny_hooked

# The same global batch, seed and steps for the one- and two-process runs: SGD (the
# reference recipe, float32) and the fast recipe (least-squares moments, then Adam, bf16).
RUNS = {"reference": dict(recipe="reference", bf16=False, steps=4, batch_size=4, seed=5),
        "fast": dict(recipe="fast", bf16=True, steps=4, batch_size=4, ls_tokens=128, lr=1e-2,
                     seed=5),
        # ls_tokens beyond the data: the warm start reads the 24 rows once (6 batches)
        "fast_capped": dict(recipe="fast", bf16=True, steps=4, batch_size=4, ls_tokens=10**6,
                            lr=1e-2, seed=5)}
WARM_TOKENS = {"reference": 0, "fast": 128, "fast_capped": 24 * 16}


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(2))


def _model(backend: str):
    return (tiny_hooked if backend == "hooked" else tiny_bridge)("gpt2")


def _worker(rank: int, world_size: int, port: int, out: str, backend: str) -> None:
    """One process of a gloo run, as torchrun would start it (env), writing rank 0's lens."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = init_distributed("cpu")
    try:
        model, results = _model(backend), {}
        for name, kw in RUNS.items():
            result = train_tuned_lens(model, _tokens(), progress=False, **kw)
            results[name] = {"state": result.lens.state_dict(), "losses": result.losses,
                             "world_size": result.world_size, "tokens": result.tokens_seen,
                             "warm": result.warm_start_tokens}
        if world.is_main:
            torch.save(results, out)
    finally:
        close_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_train_the_same_lens_as_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), out, DEFAULT_BACKEND), nprocs=2,
                                join=True)
    two = torch.load(out, weights_only=True)
    for name, kw in RUNS.items():
        one = train_tuned_lens(_model(DEFAULT_BACKEND), _tokens(), progress=False, **kw)
        assert two[name]["world_size"] == 2 and one.world_size == 1
        assert two[name]["tokens"] == one.tokens_seen == 4 * 4 * 16
        assert two[name]["warm"] == one.warm_start_tokens == WARM_TOKENS[name]
        _assert_same_training(one, two[name]["state"], two[name]["losses"], name)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_micro_batches_add_up_to_the_whole_batch(backend):
    for name, kw in RUNS.items():
        one = train_tuned_lens(_model(backend), _tokens(), progress=False, **kw)
        micro = train_tuned_lens(_model(backend), _tokens(), progress=False,
                                 micro_batch_size=1, **kw)
        assert micro.micro_batches == 4 * one.micro_batches == 16
        _assert_same_training(one, micro.lens.state_dict(), micro.losses, name)


def _assert_same_training(one, state: dict, losses: list, recipe: str) -> None:
    """Same lens and loss curve, up to the order of float32 sums. SGD passes round-off on
    as it is; the fast recipe's least-squares solve magnifies it by the moments' condition
    number, and Adam divides each gradient entry by its own RMS (so an entry near zero
    moves by ~lr whatever its sign)."""
    assert one.lens.weight.abs().sum() > 0 and len(one.losses) == len(losses) == 4
    tolerance = dict(rtol=1e-5, atol=1e-7) if recipe == "reference" else dict(rtol=1e-2,
                                                                              atol=1e-2)
    for key, value in one.lens.state_dict().items():
        torch.testing.assert_close(state[key], value, **tolerance)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses),
                               rtol=1e-5, atol=1e-6)


def test_moments_summed_over_ranks_equal_one_process():
    """The all-reduce adds the ranks' least-squares sums: two halves' sums are the whole's."""
    model = tiny_default("gpt2")
    lens = TunedLens.for_model(model)
    unembed = Unembed.from_model(model)
    whole, halves = (Moments.zeros(len(lens.hook_names), lens.d_model) for _ in range(2))
    tokens = _tokens()[:4]
    whole.add(*regression_pairs(*residuals(model, lens, tokens), unembed))
    for part in (tokens[:2], tokens[2:]):
        halves.add(*regression_pairs(*residuals(model, lens, part), unembed))
    assert halves.count == whole.count == 64
    torch.testing.assert_close(halves.xx, whole.xx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(halves.xy, whole.xy, rtol=1e-5, atol=1e-5)
    assert World().all_reduce_(halves.xx) is halves.xx


def test_world_of_one_is_a_no_op_and_batches_must_split_evenly(monkeypatch):
    world = World()
    t = torch.arange(3.0)
    assert world.all_reduce_(t) is t and torch.equal(t, torch.arange(3.0))
    assert world.broadcast_int(7) == 7 and world.is_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_distributed"):
        train_tuned_lens(tiny_default("gpt2"), _tokens(), steps=1, progress=False)


# --- streamed corpora ---------------------------------------------------------------------

def _corpus(folder) -> None:
    folder.mkdir()
    for i in range(4):
        text = f"line {i} of a small text file\n" * (9 + 5 * i) if i != 2 else "  \n"
        (folder / f"doc{i}.txt").write_text(text)


def test_stream_packs_like_the_in_memory_packing(tmp_path):
    model = tiny_default("gpt2")
    _corpus(tmp_path / "c")
    reference = pack_tokens(tokenize_texts(model, read_text_files(tmp_path / "c")), 16,
                            separator=model.tokenizer.eos_token_id)
    stream = TokenStream(model, paths=str(tmp_path / "c" / "*.txt"), seq_len=16)
    rows = torch.cat([stream.next_batch(5) for _ in range(len(reference) // 5 + 2)])
    assert torch.equal(rows, reference) and stream.next_batch(5).shape == (0, 16)
    # small chunks cut files at line breaks: the same tokens, in the same order
    chunked = TokenStream(model, paths=tmp_path / "c", seq_len=16, chunk_bytes=40)
    assert torch.equal(torch.cat([chunked.next_batch(7) for _ in range(20)]), reference)


def test_stream_resumes_without_repeating_or_skipping(tmp_path):
    model = tiny_default("gpt2")
    _corpus(tmp_path / "c")
    whole = TokenStream(model, paths=tmp_path / "c", seq_len=16, chunk_bytes=40)
    expected = torch.cat([whole.next_batch(3) for _ in range(10)])
    first = TokenStream(model, paths=tmp_path / "c", seq_len=16, chunk_bytes=40)
    head = torch.cat([first.next_batch(3) for _ in range(4)])
    state = first.state_dict()
    second = TokenStream(model, paths=tmp_path / "c", seq_len=16, chunk_bytes=40)
    second.load_state_dict(state)
    tail = torch.cat([second.next_batch(3) for _ in range(6)])
    assert torch.equal(torch.cat([head, tail]), expected)
    with pytest.raises(ValueError, match="tensor"):
        TensorRows(_tokens()).load_state_dict(state)


def test_stream_from_a_streaming_dataset_resumes(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = tiny_default("gpt2")
    texts = [f"document number {i} " * (3 + i % 4) for i in range(12)] + ["   "]
    iterable = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    from_list = TokenStream(model, texts=texts, seq_len=8)
    expected = torch.cat([from_list.next_batch(4) for _ in range(10)])
    stream = TokenStream(model, dataset=iterable, seq_len=8)
    head = torch.cat([stream.next_batch(4) for _ in range(3)])
    resumed = TokenStream(model, dataset=iterable, seq_len=8)
    resumed.load_state_dict(stream.state_dict())
    tail = torch.cat([resumed.next_batch(4) for _ in range(7)])
    assert torch.equal(torch.cat([head, tail]), expected)
    with pytest.raises(ValueError, match="column"):
        TokenStream(model, dataset=iterable, column="body")


def test_training_on_a_stream_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    model = tiny_default("gpt2")
    _corpus(tmp_path / "c")
    kw = dict(recipe="fast", steps=5, batch_size=2, ls_tokens=64, lr=1e-2, progress=False,
              checkpoint_every=1)

    def stream():
        return TokenStream(model, paths=tmp_path / "c", seq_len=16, chunk_bytes=40)

    whole = train_tuned_lens(model, stream(), **kw)

    class Interrupt(Exception):
        pass

    def stop_at_3(step, seconds, lens):
        if step == 3:
            raise Interrupt

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        train_tuned_lens(model, stream(), checkpoint_dir=ckpt, callback=stop_at_3, **kw)
    resumed = train_tuned_lens(model, stream(), checkpoint_dir=ckpt, resume=True, **kw)
    assert resumed.steps == whole.steps == 5 and resumed.losses == whole.losses
    for name, value in whole.lens.state_dict().items():
        assert torch.equal(resumed.lens.state_dict()[name], value), name
    # a stream that runs out ends training, and the result says so
    short = train_tuned_lens(model, stream(), **{**kw, "steps": 10_000})
    assert short.stop_reason == "data" and 0 < short.steps < 10_000


# --- the budget's planning (no timing: costs are recorded by hand) ------------------------

def test_clock_sizes_pieces_to_the_time_left():
    clock = Clock(budget=100.0)
    assert clock.rows_that_fit("kl", 8) == 1               # unmeasured: a one-row probe
    clock.record("kl", 2.0, rows=1)                        # 2 s per row
    assert clock.rows_that_fit("kl", 8) == 2               # pieces of <= 5% of the budget
    clock.offset = 100.0 - 3.0                             # 3 s left: one row (x1.3) fits
    assert clock.rows_that_fit("kl", 8) == 1
    assert clock.rows_that_fit("kl", 8, reserve=1.0) == 0  # not with a 1 s reserve
    clock.record("kl", 0.5, rows=1)                        # one fast piece: estimate 1.25
    assert clock.per_row["kl"] == pytest.approx(1.25)
    assert Clock().rows_that_fit("kl", 8) == 8             # no budget: everything
    assert clock.rows_that_fit("ls", 3, prior=0.1) == 3


def test_a_budget_too_small_for_a_kl_row_skips_the_kl_phase_and_says_so():
    model = tiny_default("gpt2")
    result = train_tuned_lens(model, _tokens(), steps=3, time_budget=1e-6, progress=False)
    assert result.kl_skipped and result.stop_reason == "time_budget"
    assert result.steps == 0 and result.losses == []
    # what was done, and why the call overran: the budget is below its floor
    assert result.warm_start_tokens == 0 and result.floor_seconds > 1e-6


def test_a_budget_below_the_floor_is_reported(caplog):
    model = tiny_default("gpt2")
    with caplog.at_level("WARNING", logger="tl_lenses"):
        result = train_tuned_lens(model, _tokens(), steps=3, time_budget=1e-6, progress=False)
    assert result.seconds > 1.1e-6 and "below this call's floor" in caplog.text


def test_the_fast_recipes_bf16_default_follows_the_hardware(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(devices, "fast_bf16", lambda device, native=native: native)
        assert TrainConfig().resolved("cpu").bf16 is native
        assert TrainConfig(recipe="reference").resolved("cpu").bf16 is False
        assert TrainConfig(bf16=not native).resolved("cpu").bf16 is (not native)
    amd_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n"
    sapphire = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton3 = "Features\t: fp asimd sve bf16 i8mm\n"
    assert not devices._cpuinfo_has_bf16(amd_avx2)
    assert devices._cpuinfo_has_bf16(sapphire) and devices._cpuinfo_has_bf16(graviton3)
    assert devices.fast_bf16("meta") is False


def test_an_unmeasured_kl_row_predicted_not_to_fit_is_not_started(monkeypatch):
    """No blind one-row probe: the prior decides even before any row was measured."""
    from tl_lenses.lenses.tuned.loop import Trainer

    monkeypatch.setattr(Trainer, "_kl_prior", lambda self: 1e9)   # a row "costs" 30 years
    model = tiny_default("gpt2")
    for recipe, ls_tokens in (("reference", 0), ("fast", 0)):
        result = train_tuned_lens(model, _tokens(), recipe=recipe, steps=3, ls_tokens=ls_tokens,
                                  time_budget=100.0, progress=False)
        assert result.micro_batches == 0 and result.kl_skipped and result.steps == 0
        assert result.seconds < 100.0
