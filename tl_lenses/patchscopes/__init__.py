"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by patching it elsewhere.

``core.py`` (one patched run, ``patch_hook``, ``source_state``), ``sweep.py`` (many
(l, l*) cases batched), ``presets.py`` (token identity, entity description, attribute
extraction, chain of thought), ``cross.py`` (cross-model patching through a fitted affine
map), ``view.py``, ``cli.py``.
"""

from tl_lenses.patchscopes.core import (
                                        AffineMap,
                                        PatchscopeResult,
                                        patch_hook,
                                        patchscope,
                                        source_state,
)
from tl_lenses.patchscopes.cross import AffineFit, fit_affine_map
from tl_lenses.patchscopes.presets import (
                                        AttributeResult,
                                        GenerationTable,
                                        TokenIdentityResult,
                                        attribute_extraction,
                                        chain_of_thought,
                                        entity_description,
                                        token_identity,
)
from tl_lenses.patchscopes.sweep import SweepResult, patchscope_sweep

__all__ = ["AffineFit", "AffineMap", "AttributeResult", "GenerationTable", "PatchscopeResult",
           "SweepResult", "TokenIdentityResult", "attribute_extraction", "chain_of_thought",
           "entity_description", "fit_affine_map", "patch_hook", "patchscope", "patchscope_sweep",
           "source_state", "token_identity"]
