"""An SAE's output as an exact sum: latents, decoder bias and error term.

sae-lens SAEs decode as ``out = a * (f @ W_dec + b_dec) + m`` per token, where ``f`` are
the latent activations (``hook_sae_acts_post``) and ``a``, ``m`` undo the SAE's run-time
input normalisation (``a = 1, m = 0`` without one). When spliced in with
``use_error_term`` the wrapper adds ``error = input - clean reconstruction``. So what flows
on at the SAE's hook point is

    out = sum_i f_i a W_dec[i] + (a b_dec + m) + error

and any linear readout ``u`` of it splits into one term per latent, one for the decoder
bias and one for the error. This module computes those terms from an SAE object (duck-typed:
``W_dec``, ``b_dec``, ``cfg``) and cached activations; it never imports sae_lens and never
imports a method (the DLA core imports it). Every split is checked against what the SAE
actually produced, so an architecture whose decoder is not of this form (e.g. a skip
transcoder) is refused instead of attributed wrongly.

Source of the decomposition: Marks et al. 2024, *Sparse Feature Circuits*, eq. 1 (an SAE's
output as latents times decoder rows plus bias plus error).
"""

from __future__ import annotations

import functools
import re

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import SAE_OUTPUT

# Hook points of d_model-wide SAEs that DLA splits into latents: (regex, label suffix).
_SITE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")
_SUFFIX = {"resid_pre": "", "resid_mid": " mid", "resid_post": " post",
           "attn_out": " attn", "mlp_out": " mlp"}
_NORMS = ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale")
LATENT_LABEL = re.compile(r"^(L\d+(?: \w+)?) SAE#(\d+)$")


def site_prefix(site: str) -> str:
    """The label prefix of an SAE at ``site``: ``blocks.1.hook_resid_pre`` -> ``L1``.

    Raises:
        ValueError: ``site`` is not a d_model-wide residual or attention/MLP output hook.
    """
    match = _SITE.match(site)
    if match is None:
        raise ValueError(
            f"an SAE's hook point must be a d_model-wide block hook (resid_pre, resid_mid, "
            f"resid_post, attn_out, mlp_out) to split it into latents, got {site!r}"
        )
    return f"L{match.group(1)}{_SUFFIX[match.group(2)]}"


@functools.lru_cache(maxsize=64)
def latent_labels(prefix: str, d_sae: int) -> tuple[str, ...]:
    """``('L1 SAE#0', 'L1 SAE#1', ...)``: one label per latent."""
    return tuple(f"{prefix} SAE#{i}" for i in range(d_sae))


def parse_latent_label(label: str) -> tuple[str, int] | None:
    """``'L1 SAE#123'`` -> ``('L1', 123)``; None for any other label."""
    match = LATENT_LABEL.match(label)
    return (match.group(1), int(match.group(2))) if match else None


def sae_site(sae) -> str:
    """The hook point whose value the SAE replaces (its output hook for a transcoder)."""
    meta = sae.cfg.metadata
    return meta.hook_name_out or meta.hook_name


def is_transcoder(sae) -> bool:
    """Whether the SAE reads one hook point and writes another."""
    meta = sae.cfg.metadata
    return bool(meta.hook_name_out) and meta.hook_name_out != meta.hook_name


def decoder_rows(sae) -> Float[Tensor, "d_sae d_out"]:
    """What one unit of each latent adds before the output normalisation (float32).

    TopK SAEs trained with ``rescale_acts_by_decoder_norm`` divide each activation by its
    decoder row's norm before decoding; that factor is folded into the row here.
    """
    rows = sae.W_dec.detach().float()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows


def decoder_bias(sae) -> Float[Tensor, " d_out"]:
    """The decoder bias as decoded (a tied matching-pursuit SAE may skip it)."""
    skips = "MatchingPursuit" in type(sae).__name__ and not sae.cfg.apply_b_dec_to_input
    b_dec = sae.b_dec.detach().float()
    return torch.zeros_like(b_dec) if skips else b_dec


def output_affine(
    sae, sae_in: Float[Tensor, "batch pos d_in"]
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Per-token ``(a, m)`` with ``out = a * recon + m``, undoing the input normalisation.

    Args:
        sae: a sae-lens SAE.
        sae_in: the SAE's input before its normalisation (``hook_sae_input``).

    Returns:
        ``a`` and the constant ``m`` added to every coordinate, per token.

    Raises:
        NotImplementedError: a normalisation whose output is not per-token affine.
    """
    norm = sae.cfg.normalize_activations
    x = sae_in.float()
    ones, zeros = torch.ones(x.shape[:-1]), torch.zeros(x.shape[:-1])
    if is_transcoder(sae) or norm in ("none", "expected_average_only_in"):
        # Transcoders decode into another space and skip the out-normalisation.
        return ones.to(x.device), zeros.to(x.device)
    if norm == "constant_norm_rescale":
        return x.norm(dim=-1) / sae.cfg.d_in ** 0.5, zeros.to(x.device)
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        return (x - mu).std(-1), mu[..., 0]
    raise NotImplementedError(
        f"SAE normalize_activations={norm!r} is not supported for a latent split "
        f"(supported: {_NORMS}); fold it into the SAE first"
    )


def split_terms(
    sae, acts: Float[Tensor, "batch pos d_sae"], sae_in: Float[Tensor, "batch pos d_in"],
    u: Float[Tensor, "d_out direction"],
) -> tuple[Float[Tensor, "d_sae batch pos direction"], Float[Tensor, "1 batch pos direction"]]:
    """Each latent's ``f_i a W_dec[i] · u`` and the bias term ``(a b_dec + m) · u``.

    The decoder is projected onto ``u`` before it meets the activations (no per-latent
    d_model vectors are built), as DLA does for neurons.
    """
    a, m = output_affine(sae, sae_in)
    acts = (acts.to_dense() if acts.is_sparse else acts).float()
    rows_u = decoder_rows(sae).to(u.device) @ u                  # [d_sae, direction]
    latents = torch.einsum("bpi,ik->ibpk", acts * a[..., None], rows_u)
    bias = a[..., None] * (decoder_bias(sae).to(u.device) @ u) + m[..., None] * u.sum(0)
    return latents, bias[None]


def reconstruction(
    sae, acts: Float[Tensor, "batch pos d_sae"], sae_in: Float[Tensor, "batch pos d_in"],
) -> Float[Tensor, "batch pos d_out"]:
    """``a * (f @ W_dec + b_dec) + m``: the decoder output this module's split adds up to."""
    a, m = output_affine(sae, sae_in)
    acts = (acts.to_dense() if acts.is_sparse else acts).float()
    recon = acts @ decoder_rows(sae).to(acts.device) + decoder_bias(sae).to(acts.device)
    return a[..., None] * recon + m[..., None]


def check_split(expected: Tensor, got: Tensor, sae, site: str) -> None:
    """Refuse when the split does not reproduce what the SAE produced at ``site``.

    Raises:
        NotImplementedError: the SAE's decoder is not ``a (f W_dec + b_dec) + m``.
    """
    expected, got = expected.float(), got.float()
    tolerance = 1e-4 * (1.0 + expected.abs().max().item())
    gap = (expected - got).abs().max().item() if expected.numel() else 0.0
    if not gap <= tolerance:
        raise NotImplementedError(
            f"the {type(sae).__name__} at {site!r} does not decode as latents x W_dec + b_dec "
            f"(max gap {gap:.3g} > {tolerance:.3g}; or it was bypassed at some tokens, "
            "exclude_special_tokens): a latent split of it is not supported"
        )


def saes_by_site(model, saes=()) -> dict:
    """``{site: sae}`` for the SAEs attached to ``model`` (sae-lens ``add_sae``) and ``saes``.

    Raises:
        TypeError: an entry of ``saes`` is not an SAE (no ``W_dec``/``cfg.metadata``).
        ValueError: an SAE's site is not d_model-wide, or its width is not d_model.
    """
    attached = dict(_attached_saes(model) or {})
    found = {sae_site(sae): sae for sae in attached.values()
             if _SITE.match(sae_site(sae)) and sae.W_dec.shape[-1] == model.cfg.d_model}
    for i, sae in enumerate([saes] if hasattr(saes, "W_dec") else list(saes)):
        if not hasattr(sae, "W_dec") or not hasattr(getattr(sae, "cfg", None), "metadata"):
            raise TypeError(f"saes[{i}] must be a sae-lens SAE, got {type(sae).__name__}")
        site_prefix(sae_site(sae))
        if sae.W_dec.shape[-1] != model.cfg.d_model:
            raise ValueError(f"saes[{i}] writes width {sae.W_dec.shape[-1]}, not the model's "
                             f"d_model={model.cfg.d_model}")
        found[sae_site(sae)] = sae
    return found


def _attached_saes(model) -> dict | None:
    """sae-lens's ``HookedSAETransformer.acts_to_saes``, read without ``getattr``.

    A plain attribute sits in the instance dict; asking a TransformerBridge for a missing
    one goes through its ``__getattr__`` fallbacks (~30 us, on every DLA call).
    """
    found = vars(model).get("acts_to_saes")
    if found is None and hasattr(type(model), "acts_to_saes"):  # a property, say
        found = model.acts_to_saes
    return found


def site_terms(site: str, cache, select, u: Float[Tensor, "d_model direction"], sae=None
               ) -> tuple[list[str], Float[Tensor, "n batch pos direction"]]:
    """The value at ``site`` along ``u`` as SAE terms: latents, ``b_dec``, error.

    Spliced (the cache holds ``{site}.hook_sae_output``): the latents that flowed, the
    bias, and the error term when the SAE ran with ``use_error_term``; without the SAE
    object, one term for its whole output. Not spliced: ``sae`` encodes the cached value
    and ``error = value - reconstruction`` keeps the sum exact. Not divided by any norm scale.

    ``select`` takes a cached ``[batch, pos, ...]`` tensor to the attributed cells.

    Raises:
        NotImplementedError: the SAE's output is not latents x W_dec + b_dec (+ error).
    """
    prefix = site_prefix(site)

    def at(name: str) -> Tensor:
        if name not in cache:
            raise ValueError(f"cache lacks {name!r}, which the SAE at {site!r} needs")
        return select(cache[name])

    if f"{site}.{SAE_OUTPUT}" in cache:
        out = at(f"{site}.{SAE_OUTPUT}").float()
        if sae is None:
            return [f"{prefix} SAE"], (out @ u)[None]
        acts, sae_in = at(f"{site}.hook_sae_acts_post"), at(f"{site}.hook_sae_input")
        error_name = f"{site}.hook_sae_error"
        has_error = error_name in cache  # the wrapper fires it only with use_error_term
        error = at(error_name).float() if has_error else torch.zeros_like(out)
        check_split(out, reconstruction(sae, acts, sae_in) + error, sae, site)
    else:
        source = at(sae.cfg.metadata.hook_name)
        with torch.no_grad():
            acts = sae.encode(source.to(sae.W_dec.device, sae.W_dec.dtype))
            decoded = sae.decode(acts)
        sae_in = source.float()
        check_split(decoded, reconstruction(sae, acts, sae_in), sae, site)
        error, has_error = at(site).float() - decoded.float().to(u.device), True
    latents, bias = split_terms(sae, acts.to(u.device), sae_in.to(u.device), u)
    labels = [*latent_labels(prefix, latents.shape[0]), f"{prefix} SAE b_dec"]
    terms = [latents, bias]
    if has_error:
        labels.append(f"{prefix} SAE error")
        terms.append((error.to(u.device) @ u)[None])
    return labels, torch.cat(terms)


def sae_cache_names(site: str) -> list[str]:
    """The cache entries a spliced SAE at ``site`` needs for its split."""
    return [f"{site}.{name}" for name in
            (SAE_OUTPUT, "hook_sae_acts_post", "hook_sae_input", "hook_sae_error")]


def split_sites(model, keys, saes=()) -> dict:
    """``{site: sae or None}``: where DLA splits the stream into SAE terms.

    Every d_model-wide SAE spliced in when ``keys`` (a cache's names) were recorded, with its
    SAE object where known (attached to ``model`` or in ``saes``), and every SAE of
    ``saes`` (or attached) that was not spliced, to be applied to the cached value.
    """
    known = saes_by_site(model, saes)
    # the model's possible spliced outputs (5 per layer) asked of the cache's thousands of
    # names, in C (a dict view intersected with a smaller set looks each of those up)
    outputs = _stream_sites(model.cfg.n_layers)
    sites = {outputs[name]: known.get(outputs[name]) for name in keys.keys() & outputs.keys()}
    for site, sae in known.items():
        sites.setdefault(site, sae)
    return sites


@functools.lru_cache(maxsize=32)
def _stream_sites(n_layers: int) -> dict[str, str]:
    """``{spliced SAE's output hook: site}`` for every d_model-wide site of a model.

    Callers must not change the (shared) dict.
    """
    return {f"blocks.{layer}.hook_{kind}.{SAE_OUTPUT}": f"blocks.{layer}.hook_{kind}"
            for layer in range(n_layers) for kind in _SUFFIX}


def split_hooks(model, saes=()) -> list[str]:
    """Hook points to cache for :func:`split_sites` (a ``names_filter`` addition)."""
    names = []
    for site, sae in saes_by_site(model, saes).items():
        names += [site, sae.cfg.metadata.hook_name, *sae_cache_names(site)]
    return names


__all__ = [
    "site_prefix", "latent_labels", "parse_latent_label", "sae_site", "is_transcoder",
    "decoder_rows", "decoder_bias", "output_affine", "split_terms", "reconstruction",
    "check_split", "saes_by_site", "site_terms", "sae_cache_names", "split_sites",
    "split_hooks",
]
