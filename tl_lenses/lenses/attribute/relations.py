"""Relations for linear relational embeddings: a JSON format, a validating loader, prompts.

A relation file uses the fields of the LRE paper's data (Hernandez et al. 2024), so its
files load unchanged::

    {"name": "country capital city",
     "prompt_templates": ["The capital of {} is"],        # few-shot templates, one {} each
     "prompt_templates_zs": ["The capital of {} is the city of"],   # zero-shot templates
     "properties": {"relation_type": "factual", ...},      # free-form, optional
     "samples": [{"subject": "France", "object": "Paris"}, ...]}

Objects follow the template after a space (``"... is" + " Paris"``). An object that is
several tokens is kept, and everything that scores an object uses its FIRST token
(``" New Delhi"`` -> ``" New"``); :func:`multi_token_objects` lists which ones are.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tl_lenses.viz.brief import brief_repr

STARTER_DIR = Path(__file__).parent / "starter_relations"


@dataclass(frozen=True)
class Sample:
    """One (subject, object) fact of a relation."""

    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    """A relation: templates with one ``{}`` for the subject, and its samples."""

    name: str
    prompt_templates: tuple[str, ...]
    samples: tuple[Sample, ...]
    prompt_templates_zs: tuple[str, ...] = ()
    properties: dict = field(default_factory=dict, compare=False)

    __repr__ = brief_repr  # one line: its samples by count

    def __post_init__(self):
        check_relation(self)

    @property
    def subjects(self) -> list[str]:
        """Every sample's subject, in order."""
        return [s.subject for s in self.samples]

    @property
    def objects(self) -> list[str]:
        """Every sample's object, in order."""
        return [s.object for s in self.samples]

    def split(self, n_train: int, *, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
        """(train, held-out): ``n_train`` samples drawn with ``seed``, and the rest."""
        import random

        if isinstance(n_train, bool) or not isinstance(n_train, int) \
                or not 1 <= n_train < len(self.samples):
            raise ValueError(
                f"n_train must be an int in [1, {len(self.samples)}) for relation "
                f"{self.name!r} with {len(self.samples)} samples, got {n_train!r}"
            )
        order = list(range(len(self.samples)))
        random.Random(seed).shuffle(order)
        picked = [self.samples[i] for i in order]
        return picked[:n_train], picked[n_train:]


def check_template(template: str, *, argument: str = "template") -> str:
    """Fail unless ``template`` is a string with exactly one ``{}`` and no other field."""
    if not isinstance(template, str):
        raise TypeError(f"{argument} must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise ValueError(f"{argument} {template!r} is not a valid template: {error}") from None
    if fields != [""]:
        raise ValueError(
            f"{argument} must contain exactly one '{{}}' for the subject (and no other "
            f"braces), got {template!r}"
        )
    return template


def check_relation(relation: Relation) -> None:
    """The checks behind :class:`Relation`: names, templates, non-empty distinct samples."""
    if not isinstance(relation.name, str) or not relation.name.strip():
        raise ValueError(f"relation name must be a non-empty string, got {relation.name!r}")
    where = f"relation {relation.name!r}"
    if not relation.prompt_templates:
        raise ValueError(f"{where}: prompt_templates must list at least one template")
    for i, template in enumerate(relation.prompt_templates):
        check_template(template, argument=f"{where}: prompt_templates[{i}]")
    for i, template in enumerate(relation.prompt_templates_zs):
        check_template(template, argument=f"{where}: prompt_templates_zs[{i}]")
    if len(relation.samples) < 2:
        raise ValueError(f"{where}: samples must hold at least 2 facts, got "
                         f"{len(relation.samples)}")
    for i, sample in enumerate(relation.samples):
        for key in ("subject", "object"):
            value = getattr(sample, key)
            if not isinstance(value, str) or not value.strip() or value != value.strip():
                raise ValueError(f"{where}: samples[{i}].{key} must be non-empty text without "
                                 f"surrounding spaces, got {value!r}")
    seen = [s.subject for s in relation.samples]
    duplicates = sorted({s for s in seen if seen.count(s) > 1})
    if duplicates:
        raise ValueError(f"{where}: subjects must be distinct, repeated: {duplicates}")


def relation_from_dict(data: dict, *, source: str = "relation") -> Relation:
    """A :class:`Relation` from parsed JSON (the LRE paper's field names)."""
    if not isinstance(data, dict):
        raise TypeError(f"{source} must be a JSON object, got {type(data).__name__}")
    missing = [key for key in ("name", "prompt_templates", "samples") if key not in data]
    if missing:
        raise ValueError(f"{source} lacks the fields {missing}")
    samples = data["samples"]
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise ValueError(f"{source}: samples must be a list of {{subject, object}} objects")
    bad = [i for i, s in enumerate(samples) if not {"subject", "object"} <= set(s)]
    if bad:
        raise ValueError(f"{source}: samples {bad[:5]} lack a subject or an object")
    templates = data["prompt_templates"]
    zero_shot = data.get("prompt_templates_zs", [])
    for key, value in (("prompt_templates", templates), ("prompt_templates_zs", zero_shot)):
        if not isinstance(value, list):
            raise ValueError(f"{source}: {key} must be a list of strings")
    return Relation(
        name=data["name"], prompt_templates=tuple(templates),
        samples=tuple(Sample(s["subject"], s["object"]) for s in samples),
        prompt_templates_zs=tuple(zero_shot), properties=dict(data.get("properties", {})),
    )


def load_relation(path) -> Relation:
    """Load and validate one relation file (ours or the LRE paper's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"relation file {path} is not valid JSON: {error}") from None
    return relation_from_dict(data, source=f"relation file {path}")


def starter_relations() -> dict[str, Relation]:
    """The relations shipped with tl_lenses, by file stem (``country_capital``, ...)."""
    files = sorted(STARTER_DIR.glob("*.json"))
    return {f.name[:-5]: relation_from_dict(json.loads(f.read_text(encoding="utf-8")),
                                            source=f"starter relation {f.name}")
            for f in files}


def get_relation(name_or_path, *, argument: str = "relation") -> Relation:
    """A starter relation by name (``"country_capital"``) or a relation file by path.

    The one resolver behind every function taking a ``relation``: a :class:`Relation` is
    returned as it is.

    Raises:
        TypeError: naming ``argument``, for anything but a Relation, a str or a path.
        ValueError: for a name that is neither a starter relation nor a ``.json`` file.
    """
    if isinstance(name_or_path, Relation):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a Relation, a starter relation's name or a "
                        f"relation file, got {type(name_or_path).__name__}")
    starters = starter_relations()
    if str(name_or_path) in starters:
        return starters[str(name_or_path)]
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        return load_relation(name_or_path)
    raise ValueError(f"{argument} must be a starter name {sorted(starters)} or a .json file, "
                     f"got {name_or_path!r}")


def few_shot_prompt(template: str, subject: str, demos: Sequence[Sample] = ()) -> str:
    """Demonstrations (``template(s_j) + " " + o_j``, one a line), then ``template(subject)``.

    The subject's demonstration is never shown for itself: drop it from ``demos`` first.
    """
    check_template(template)
    lines = [f"{template.format(d.subject)} {d.object}" for d in demos]
    return "\n".join([*lines, template.format(subject)])


def multi_token_objects(model, relation: Relation) -> list[str]:
    """Objects that are several tokens after a space (scored by their first token)."""
    return [o for o in dict.fromkeys(relation.objects)
            if len(model.to_tokens(" " + o, prepend_bos=False)[0]) > 1]


def object_token(model, obj: str) -> int:
    """The id scored for an object: the first token of ``" " + obj``."""
    return int(model.to_tokens(" " + obj, prepend_bos=False)[0, 0])
