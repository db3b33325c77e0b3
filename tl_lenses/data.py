"""Text -> token batches for training and evaluating lenses.

Sources: text files (paths, folders searched recursively, globs), a list of strings, token
tensors, a Hugging Face ``datasets`` dataset, or text the model generates itself (seeded).
Documents are tokenized, joined with the tokenizer's end-of-text token and packed into
fixed-length rows; a seeded shuffle then splits the rows into train and held-out sets, so
no row is in both.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_lenses.inputs import require_tokenizer
from tl_lenses.models import check_model
from tl_lenses.viz.brief import brief_repr

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py", ".html", ".tex", ".json", ".csv")


@dataclass
class TokenSplit:
    """Packed token rows: ``train`` and ``held_out`` (disjoint rows of one packing)."""

    train: Int[Tensor, "_ pos"]
    held_out: Int[Tensor, "_ pos"]

    __repr__ = brief_repr  # one line: tensors by shape, lists by length

    @property
    def n_tokens(self) -> int:
        """Tokens in both splits."""
        return self.train.numel() + self.held_out.numel()


def read_text_files(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """The contents of text files named by paths, folders (recursive) or glob patterns.

    Folders contribute files ending in one of ``TEXT_SUFFIXES``; a file named directly is
    read whatever its name. Files are read as UTF-8 (undecodable bytes replaced), in
    sorted order, so a corpus always yields the same documents.
    """
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in text_file_paths(paths)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"the text files in {paths} are all empty")
    return texts


def text_file_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files named by paths, folders (recursive) or globs, each once, in order."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("paths must name at least one file, folder or glob")
    files: list[Path] = []
    for entry in paths:
        files += _expand(entry)
    return list(dict.fromkeys(files))


def _expand(entry) -> list[Path]:
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*")
                       if p.is_file() and any(p.name.endswith(s) for s in TEXT_SUFFIXES))
    else:
        found = sorted(Path(p) for p in glob.glob(str(entry), recursive=True)
                       if Path(p).is_file())
    if not found:
        raise FileNotFoundError(f"no text files at {str(entry)!r} (not a file, a folder with "
                                f"{'/'.join(TEXT_SUFFIXES)} files, or a matching glob)")
    return found


def dataset_texts(dataset, column: str = "text", limit: int | None = None) -> list[str]:
    """The strings in ``column`` of a Hugging Face ``datasets`` dataset (first ``limit``)."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "reading a Hugging Face dataset needs the optional 'datasets' package: "
            "pip install 'tl_lenses[data]'"
        ) from None
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if column not in (dataset.column_names or [column]):
        raise ValueError(f"dataset has no column {column!r}; it has {dataset.column_names}")
    texts = []
    for row in dataset:
        if limit is not None and len(texts) >= limit:
            break
        texts.append(row[column])
    return [t for t in texts if isinstance(t, str) and t.strip()]


def check_seq_len(model, seq_len, *, low: int = 2) -> None:
    """Refuse a row length below ``low`` or above the model's n_ctx, naming both.

    Rows longer than n_ctx cannot run through the model: refused where they are made,
    not at the first forward pass that reads them.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < low:
        raise ValueError(f"seq_len must be an int >= {low}, got {seq_len!r}")
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} is longer than the model's n_ctx="
                         f"{model.cfg.n_ctx}: no row of it could run; pass seq_len <= "
                         f"{model.cfg.n_ctx}")


def generated_tokens(model, n_rows: int, seq_len: int, *, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 8) -> Int[Tensor, "batch pos"]:
    """``n_rows`` sequences of ``seq_len`` tokens sampled from ``model`` itself (seeded).

    Each row starts from a token drawn uniformly from the vocabulary; the rest is sampled
    with the given temperature, without stopping at end-of-text.
    """
    check_model(model)
    for name, value in (("n_rows", n_rows), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_seq_len(model, seq_len, low=1)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for start in range(0, n_rows, batch_size):
            n = min(batch_size, n_rows - start)
            tokens = torch.randint(0, model.cfg.d_vocab, (n, 1), generator=generator)
            rows.append(_sample(model, tokens, seq_len, temperature, generator))
    return torch.cat(rows)


def _sample(model, tokens, seq_len, temperature, generator):
    """Ancestral sampling without a KV cache (simple, and the same on both backends)."""
    device = model.cfg.device
    while tokens.shape[1] < seq_len:
        logits = model(tokens.to(device))[:, -1].float().cpu()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def tokenize_texts(model, texts: Sequence[str]) -> list[Tensor]:
    """Each text as a 1-D tensor of token ids (no BOS, no padding)."""
    require_tokenizer(model)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    tokenizer = model.tokenizer
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for t in texts if t]


def pack_tokens(docs: Sequence[Tensor], seq_len: int, *,
                separator: int | None = None) -> Int[Tensor, "batch pos"]:
    """Concatenate documents (``separator`` between them) and cut into ``seq_len`` rows.

    The last partial row is dropped.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    parts = []
    for doc in docs:
        parts.append(doc.reshape(-1).long())
        if separator is not None:
            parts.append(torch.tensor([separator]))
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    n_rows = stream.numel() // seq_len
    return stream[: n_rows * seq_len].reshape(n_rows, seq_len)


def token_split(model, *, paths=None, texts: Sequence[str] | None = None,
                tokens: Tensor | None = None, dataset=None, generate: int | None = None,
                seq_len: int = 128, held_out: float = 0.1, seed: int = 0,
                max_tokens: int | None = None) -> TokenSplit:
    """Packed train / held-out token rows from exactly one source.

    Documents are tokenized, joined with the tokenizer's end-of-text token where there is one,
    and packed into rows of ``seq_len``; rows are then split at random.

    Args:
        model: the model whose tokenizer is used.
        paths: text files, folders or globs.
        texts: strings, one document each.
        tokens: an int tensor; its rows are treated as documents and repacked.
        dataset: a HF dataset with a ``text`` column (needs ``datasets``).
        generate: a number of rows of the model's own samples, seeded by ``seed``.
        seq_len: tokens per row, at most the model's ``n_ctx``.
        held_out: the fraction of rows held out, in [0, 1).
        seed: the split's (and the samples') seed.
        max_tokens: caps the corpus (after packing, before the split).

    Returns:
        A :class:`TokenSplit` with int ``train`` and ``held_out`` rows ``[rows, seq_len]``.

    Raises:
        ValueError: naming the argument: none or several sources, too little text for one
            row, ``seq_len`` (2..n_ctx) or ``held_out`` out of range.
        FileNotFoundError: a path that matches no file.

    >>> split = token_split(model, texts=["some text " * 40], seq_len=16, held_out=0.25)
    >>> split.train.shape[1], split.held_out.shape[0] > 0
    (16, True)
    """
    check_model(model)
    given = [name for name, value in (("paths", paths), ("texts", texts), ("tokens", tokens),
                                      ("dataset", dataset), ("generate", generate))
             if value is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of paths, texts, tokens, dataset, generate; "
                         f"got {given}")
    if not isinstance(held_out, (int, float)) or not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    if generate is not None:
        rows = generated_tokens(model, generate, seq_len, seed=seed)
    else:
        docs = _documents(model, paths, texts, tokens, dataset)  # checks the source first
        check_seq_len(model, seq_len)
        rows = pack_tokens(docs, seq_len, separator=_separator(model))
    if max_tokens is not None:
        rows = rows[: max(2, max_tokens // seq_len)]
    return split_rows(rows, held_out, seed)


def _documents(model, paths, texts, tokens, dataset) -> list[Tensor]:
    if tokens is not None:
        if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dim() > 2:
            raise ValueError("tokens must be an int tensor of ids shaped [pos] or [batch, pos]")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab):
            raise ValueError(f"tokens has ids outside [0, {model.cfg.d_vocab})")
        return list(tokens.reshape(-1, tokens.shape[-1]).cpu())
    if paths is not None:
        texts = read_text_files(paths)
    elif dataset is not None:
        texts = dataset_texts(dataset)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    return tokenize_texts(model, texts)


def _separator(model) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    return None if tokenizer is None else tokenizer.eos_token_id


def split_rows(rows: Int[Tensor, "batch pos"], held_out: float, seed: int) -> TokenSplit:
    """A seeded shuffle of the rows, cut into train and held-out (each at least one row)."""
    if rows.shape[0] < 2:
        raise ValueError(f"the corpus packs into {rows.shape[0]} row(s) of {rows.shape[-1]} "
                         "tokens; need at least 2 (more text or a smaller seq_len)")
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = min(rows.shape[0] - 1, max(1, round(held_out * rows.shape[0])))
    return TokenSplit(train=rows[order[n_held:]], held_out=rows[order[:n_held]])
