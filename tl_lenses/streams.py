"""Token rows for training, drawn lazily: an in-memory shuffle or a streamed corpus.

Two sources of global batches, both resumable from a small ``state_dict()``:

- :class:`TensorRows`: a seeded per-epoch shuffle of an in-memory ``[rows, pos]`` tensor.
- :class:`TokenStream`: text files (paths, folders, globs), a Hugging Face dataset (a
  streaming ``IterableDataset`` or a map-style ``Dataset``) or a list of strings, tokenised
  and packed into ``seq_len`` rows as they are needed. Memory is bounded by one text chunk
  (``chunk_bytes`` of a file, or one dataset example) plus the packing buffer, whatever the
  corpus size. The position (document, byte offset, unpacked tokens) is the state, so a
  resumed stream neither repeats nor skips a token.

Documents are joined with the tokenizer's end-of-text token, as :func:`tl_lenses.data.
pack_tokens` does: a corpus of files smaller than ``chunk_bytes`` packs into exactly the rows
of ``token_split``'s packing (before its shuffle). A larger file is tokenised in chunks that
end at line breaks (the tokens at a chunk boundary may differ from tokenising it whole).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_lenses.data import _separator, check_seq_len, text_file_paths
from tl_lenses.inputs import require_tokenizer


class TensorRows:
    """Global batches of an in-memory tensor: batch ``i`` of a seeded per-epoch shuffle.

    Args:
        tokens: ``[rows, pos]`` token ids.
        seed: the shuffle of epoch ``e`` is ``randperm`` seeded with ``seed + e``.
    """

    def __init__(self, tokens: Int[Tensor, "batch pos"], seed: int = 0):
        self.tokens, self.seed, self.index = tokens, seed, 0

    @property
    def seq_len(self) -> int:
        """Tokens per row."""
        return self.tokens.shape[1]

    def next_batch(self, n_rows: int) -> Int[Tensor, "batch pos"]:
        """The next ``min(n_rows, rows)`` rows; epochs repeat with a new shuffle (never ends)."""
        n, size = self.tokens.shape[0], min(n_rows, self.tokens.shape[0])
        epoch, j = divmod(self.index, max(1, n // size))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        self.index += 1
        return self.tokens[order[j * size:(j + 1) * size]]

    def batches_before_repeat(self, n_rows: int) -> int:
        """How many more ``next_batch(n_rows)`` calls return rows not yet drawn.

        The batches left in the current epoch's shuffle (its last ``rows % n_rows`` rows
        are never drawn); the next batch after them starts a new epoch and repeats rows.
        """
        n, size = self.tokens.shape[0], min(n_rows, self.tokens.shape[0])
        per_epoch = max(1, n // size)
        return per_epoch - self.index % per_epoch

    def state_dict(self) -> dict:
        """The position: the index of the next batch."""
        return {"kind": "tensor", "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (ValueError for another kind of source)."""
        _check_kind(state, "tensor")
        self.index = int(state["index"])


class TokenStream:
    """Rows of ``seq_len`` tokens packed lazily from files, a HF dataset or strings.

    Args:
        model: supplies the tokenizer (and its end-of-text token as the separator).
        paths: text files, folders (searched recursively) or glob patterns.
        dataset: a ``datasets.IterableDataset`` (streaming) or ``datasets.Dataset``.
        texts: a list of strings.
        seq_len: tokens per row.
        column: the dataset's text column.
        chunk_bytes: a file is read and tokenised this many bytes at a time (to the next
            line break), which bounds memory.

    Raises:
        ValueError: not exactly one source, or a bad ``seq_len``/``chunk_bytes``.
        FileNotFoundError: a path matches no text file.
    """

    def __init__(self, model, *, paths=None, dataset=None, texts: Sequence[str] | None = None,
                 seq_len: int = 128, column: str = "text", chunk_bytes: int = 1 << 20):
        given = [n for n, v in (("paths", paths), ("dataset", dataset), ("texts", texts))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of paths, dataset, texts; got {given}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        require_tokenizer(model)
        self.tokenizer, self.separator = model.tokenizer, _separator(model)
        self.seq_len, self.chunk_bytes, self.column = seq_len, chunk_bytes, column
        self.files = text_file_paths(paths) if paths is not None else None
        self.dataset = _check_dataset(dataset, column) if dataset is not None else None
        if texts is not None and (isinstance(texts, str)
                                  or not all(isinstance(t, str) for t in texts)):
            raise TypeError("texts must be a list of strings")
        self.texts = list(texts) if texts is not None else None
        check_seq_len(model, seq_len)  # after the source's own checks
        self.doc, self.offset, self.rows = 0, 0, 0          # the position in the corpus
        self.doc_has_tokens = False                         # the document so far gave tokens
        self.buffer = torch.zeros(0, dtype=torch.long)      # tokens read but not yet packed
        self._examples = None                               # the dataset iterator, lazily

    def next_batch(self, n_rows: int) -> Int[Tensor, "batch pos"]:
        """The next ``n_rows`` rows (fewer, possibly none, at the end of the corpus)."""
        need = n_rows * self.seq_len
        pieces = [self.buffer]
        have = self.buffer.numel()
        while have < need:
            tokens = self._next_tokens()
            if tokens is None:
                break
            pieces.append(tokens)
            have += tokens.numel()
        stream = torch.cat(pieces)
        n = min(n_rows, stream.numel() // self.seq_len)
        self.buffer = stream[n * self.seq_len:].clone()
        self.rows += n
        return stream[: n * self.seq_len].reshape(n, self.seq_len)

    def state_dict(self) -> dict:
        """The position: document, byte offset in it, rows so far, unpacked tokens."""
        return {"kind": "stream", "doc": self.doc, "offset": self.offset, "rows": self.rows,
                "buffer": self.buffer.clone(), "seq_len": self.seq_len,
                "doc_has_tokens": self.doc_has_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (ValueError for another source or seq_len)."""
        _check_kind(state, "stream")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"the stream state is for seq_len={state['seq_len']}, "
                             f"not {self.seq_len}")
        self.doc, self.offset, self.rows = state["doc"], state["offset"], state["rows"]
        self.buffer, self._examples = state["buffer"].clone(), None
        self.doc_has_tokens = bool(state["doc_has_tokens"])

    def _next_tokens(self) -> Tensor | None:
        """The tokens of the next chunk of text (+ separator at a document's end), or None."""
        while True:
            piece = self._next_text()
            if piece is None:
                return None
            text, ends_doc = piece
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            self.doc_has_tokens = self.doc_has_tokens or bool(ids)
            if ends_doc:
                if self.separator is not None and self.doc_has_tokens:
                    ids.append(self.separator)
                self.doc_has_tokens = False
            if ids:
                return torch.tensor(ids, dtype=torch.long)

    def _next_text(self) -> tuple[str, bool] | None:
        """(text, whether it ends its document); whitespace-only text comes back as ""."""
        if self.files is not None:
            return self._next_file_chunk()
        if self.texts is not None:
            if self.doc >= len(self.texts):
                return None
            self.doc += 1
            return _document(self.texts[self.doc - 1]), True
        return self._next_example()

    def _next_file_chunk(self) -> tuple[str, bool] | None:
        if self.doc >= len(self.files):
            return None
        with open(self.files[self.doc], "rb") as file:
            file.seek(self.offset)
            data = file.read(self.chunk_bytes)
            data += file.readline() if data and not data.endswith(b"\n") else b""
            self.offset = file.tell()
            at_end = not file.read(1)
        if at_end:
            self.doc, self.offset = self.doc + 1, 0
        return _document(data.decode("utf-8", errors="replace")), at_end

    def _next_example(self) -> tuple[str, bool] | None:
        if self._examples is None:
            self._examples = _examples_from(self.dataset, self.doc)
        row = next(self._examples, None)
        if row is None:
            return None
        self.doc += 1
        value = row.get(self.column)
        return (_document(value) if isinstance(value, str) else ""), True


def _document(text: str) -> str:
    """Whitespace-only text is skipped, as ``read_text_files``/``dataset_texts`` skip it."""
    return text if text.strip() else ""


def _check_dataset(dataset, column: str):
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("streaming a Hugging Face dataset needs the optional "
                                  "'datasets' package: pip install 'tl_lenses[data]'") from None
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or IterableDataset, "
                        f"got {type(dataset).__name__}")
    names = dataset.column_names
    if names is not None and column not in names:
        raise ValueError(f"dataset has no column {column!r}; it has {names}")
    return dataset


def _examples_from(dataset, start: int):
    """An iterator over the dataset's examples from index ``start`` (skipped, not read)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return iter(dataset.skip(start) if start else dataset)
    return (dataset[i] for i in range(start, len(dataset)))


def _check_kind(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"data state is for a {found!r} source, not a {kind!r} one")
