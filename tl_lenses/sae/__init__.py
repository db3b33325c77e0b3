"""tl_lenses next to sae-lens: DLA split into SAE latents, and lenses on decoder directions.

Nothing here imports sae_lens: SAEs are read through their attributes (``W_dec``, ``b_dec``,
``cfg``) and a HookedSAETransformer through its hook points, so ``import tl_lenses`` works
without the optional extra ``tl_lenses[sae]``. DLA itself lives in :mod:`tl_lenses.attribution`
(``dla(model, input, directions, saes=[sae])``); this package holds the latent split it
uses, the latent lens and the views.
"""

from tl_lenses.sae.decoder_lens import (
    LatentLensResult,
    latent_directions,
    latent_lens,
    readout_matrix,
)
from tl_lenses.sae.latents import (
    decoder_rows,
    parse_latent_label,
    sae_site,
    saes_by_site,
    site_terms,
)
from tl_lenses.sae.view import (
    latent_lens_html,
    latent_lens_page,
    top_latents_html,
    top_latents_page,
)

__all__ = [
    "LatentLensResult", "latent_lens", "latent_directions", "readout_matrix",
    "decoder_rows", "parse_latent_label", "sae_site", "saes_by_site", "site_terms",
    "latent_lens_html", "latent_lens_page", "top_latents_html", "top_latents_page",
]
