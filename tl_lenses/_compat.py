"""Everything that differs between TransformerLens 3.x and 4.x, in one place.

tl_lenses supports ``transformer_lens>=3.8,<5``. TL 4.0 removed ``HookedTransformer``,
``HookedTransformerConfig`` and ``transformer_lens.pretrained`` (its HF weight converters);
``TransformerBridge`` is its one backend. Every other module asks this one instead of
importing those names, so ``import tl_lenses`` works on both majors and HookedTransformer
support is used where it exists:

- :func:`check_supported`: TL 1.0-3.7 refused at import (3.5-3.7's Bridges give other
  numbers).
- ``HAS_HOOKED``: whether this TL has ``HookedTransformer`` (3.x).
- ``DEFAULT_BACKEND``: ``"hooked"`` on 3.x (unchanged), ``"bridge"`` on 4.x.
- :func:`require_hooked`: the one refusal for HookedTransformer-only features on 4.x
  (:class:`HookedTransformerUnavailable`, a ``NotImplementedError``).
- :func:`is_hooked_transformer`, :func:`hooked_classes`, :func:`weight_converter`,
  :func:`bridge_from_module`, :func:`official_model_name`, :func:`post_norm_architectures`:
  the version-specific objects behind one call each.

The Bridge builder (``build_bridge_from_module``) and its compatibility mode have the same
signature on 3.9 and 4.3, and every tl_lenses method gives bit-identical numbers on a tiny
Bridge under both (checked when this module was written), so only the HookedTransformer
side needs a switch.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import torch


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


TL_VERSION: str = importlib.metadata.version("transformer_lens")
TL_MAJOR: int = _major(TL_VERSION)


def check_supported(version: str) -> None:
    """Refuse TransformerLens 1.0-3.7 with an ImportError naming the version needed.

    3.5-3.7's Bridges compute other numbers (DLA's parts missed the logit by up to 7), so
    they are refused here rather than trusted method by method. 0.0.0, a source checkout
    of TL, passes.
    """
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if (1, 0) <= release < (3, 8):
        raise ImportError(f"tl_lenses needs transformer_lens>=3.8,<5, found {version}; "
                          "pip install 'transformer_lens>=3.8,<5'")


check_supported(TL_VERSION)

try:  # TL 3.x
    from transformer_lens import HookedTransformer as _HookedTransformer
    from transformer_lens import HookedTransformerConfig as _HookedTransformerConfig
except ImportError:  # TL 4.x removed both
    _HookedTransformer = None
    _HookedTransformerConfig = None

HAS_HOOKED: bool = _HookedTransformer is not None
DEFAULT_BACKEND: str = "hooked" if HAS_HOOKED else "bridge"


class HookedTransformerUnavailable(NotImplementedError):
    """A HookedTransformer-only feature was asked for under TransformerLens 4.x."""


def require_hooked(feature: str) -> None:
    """Refuse a HookedTransformer-only feature where TL has no HookedTransformer.

    Args:
        feature: What needs it, named in the error (e.g. ``"backend='hooked'"``).

    Raises:
        HookedTransformerUnavailable: (a ``NotImplementedError``) under TransformerLens 4.x,
            naming ``feature``, the installed version and the way out (the Bridge, or
            ``transformer_lens<4``).
    """
    if not HAS_HOOKED:
        raise HookedTransformerUnavailable(
            f"{feature}: HookedTransformer is unavailable in TransformerLens {TL_VERSION} "
            "(removed in 4.0); use a TransformerBridge (backend='bridge', "
            "--backend bridge) or install 'transformer_lens>=3.8,<4'"
        )


@functools.cache  # asked once per layer by DLA
def post_norm_architectures() -> frozenset[str]:
    """HF architectures whose blocks normalise each sublayer's output (OLMo-2, OLMo-3)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    return frozenset(POST_NORM_ARCHITECTURES)


def hooked_classes() -> tuple[Any, Any]:
    """``(HookedTransformer, HookedTransformerConfig)`` of TL 3.x.

    Raises:
        NotImplementedError: Under TL 4.x (see :func:`require_hooked`).
    """
    require_hooked("backend='hooked'")
    return _HookedTransformer, _HookedTransformerConfig


def is_hooked_transformer(model: Any) -> bool:
    """Whether ``model`` is a HookedTransformer (always False under TL 4.x)."""
    return HAS_HOOKED and isinstance(model, _HookedTransformer)


def weight_converter(architecture: str):
    """TL 3.x's HF -> HookedTransformer state-dict converter for ``architecture``.

    Args:
        architecture: ``"LlamaForCausalLM"`` or ``"GPT2LMHeadModel"``.

    Returns:
        ``convert(hf_model, cfg) -> state_dict`` from ``transformer_lens.pretrained``.

    Raises:
        NotImplementedError: Under TL 4.x, which removed ``transformer_lens.pretrained``.
        ValueError: For another architecture.
    """
    require_hooked("converting HF weights for backend='hooked'")
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    converters = {"LlamaForCausalLM": convert_llama_weights,
                  "GPT2LMHeadModel": convert_gpt2_weights}
    if architecture not in converters:
        raise ValueError(f"architecture must be one of {sorted(converters)}, got {architecture!r}")
    return converters[architecture]


def bridge_from_module(hf_model: torch.nn.Module, architecture: str, *, tokenizer,
                       model_name: str):
    """Wrap an in-memory HF model as a TransformerBridge (not yet in compatibility mode).

    The builder has the same signature on TL 3.9 and 4.3; it records the HF model's own
    device and dtype in the Bridge's config.

    Args:
        hf_model: A HF causal LM (its parameters are shared with the Bridge, not copied).
        architecture: The HF architecture name, e.g. ``"LlamaForCausalLM"``.
        tokenizer: The model's tokenizer.
        model_name: The name the Bridge's config carries.

    Returns:
        A ``TransformerBridge`` around ``hf_model``.
    """
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(
        hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer,
        model_name=model_name,
    )


def official_model_name(name: str) -> str:
    """TransformerLens' official (Hugging Face) name for a model name or alias.

    TL 3.x resolves names in ``transformer_lens.loading_from_pretrained``; TL 4.x removed
    that module and moved the resolver to ``transformer_lens.supported_models``.

    Args:
        name: A TL model name or alias, e.g. ``"gpt2"`` or ``"pythia-70m"``.

    Returns:
        The official name, e.g. ``"EleutherAI/pythia-70m"``.

    Raises:
        ValueError: TL knows no model of that name.
    """
    try:  # TL 3.x
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:  # TL 4.x
        from transformer_lens.supported_models import get_official_model_name
    return get_official_model_name(name)
