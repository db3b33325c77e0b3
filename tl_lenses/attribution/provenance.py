"""Which model a DLA result came from, so that its views never show another model's heads.

A result keeps a :class:`ModelStamp`: a weak reference to the model (the result does not keep
the model alive) and its shape (``n_layers``, ``n_heads``, ``d_model``, ``d_vocab``).
:func:`check_source` accepts, for ``with_attention``:

* the very model object the result came from;
* once that object is gone (garbage-collected: the model was re-loaded), any model of the same
  shape. Same-shaped weights cannot be told apart then; recompute the result to be sure.

It refuses a model of another shape, and a different model object while the original still
exists (another model, or the same weights on the other backend: pass the one the result
came from). Stamping costs a weak reference and four ints; checking, as much.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from tl_lenses.models import check_model

SHAPE = ("n_layers", "n_heads", "d_model", "d_vocab")


@dataclass(frozen=True)
class ModelStamp:
    """A weak reference to a model and its shape (see the module docstring).

    Pickled (a result saved with ``pickle`` or ``torch.save``), it loads as the stamp of a
    model that is gone: a weak reference cannot be pickled, and the loading process has
    another model object anyway, so ``check_source`` then checks the shape only.
    """

    ref: weakref.ReferenceType
    shape: tuple[int, ...]
    name: str

    def __reduce__(self):
        return _gone_stamp, (self.shape, self.name)


class _Gone:
    """A stand-in whose only instance dies at once, leaving a dead weak reference."""


def _gone_stamp(shape: tuple[int, ...], name: str) -> ModelStamp:
    return ModelStamp(weakref.ref(_Gone()), tuple(shape), name)


def stamp(model) -> ModelStamp:
    """The :class:`ModelStamp` of ``model``."""
    cfg = model.cfg
    return ModelStamp(weakref.ref(model), tuple(int(getattr(cfg, key)) for key in SHAPE),
                      str(getattr(cfg, "model_name", "")))


def check_source(source: ModelStamp | None, model, *, argument: str = "model") -> None:
    """Raise ValueError unless ``model`` may be the model ``source`` stamped.

    ``source=None`` (a result built by hand) checks nothing.
    """
    check_model(model)
    if source is None:
        return
    mine = stamp(model)
    for key, theirs, ours in zip(SHAPE, source.shape, mine.shape):
        if theirs != ours:
            raise ValueError(
                f"{argument} is not the model this result came from: {key}={ours} here, "
                f"{theirs} there ({mine.name!r} vs {source.name!r})"
            )
    original = source.ref()
    if original is not None and original is not model:
        raise ValueError(
            f"{argument} is not the model this result came from (a different model object, "
            f"{mine.name!r}, while the original {source.name!r} still exists); pass that "
            "model, or recompute the result on this one"
        )
