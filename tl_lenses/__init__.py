"""tl_lenses: lenses on the hidden representations of TransformerLens models."""

from tl_lenses.dla import DLAResult, LogitDirections, dla, logit_directions
from tl_lenses.dla_paths import HeadPathResult, head_path_dla
from tl_lenses.lenses.attribute import AttributeLens, attribute_lens
from tl_lenses.lre import LRE, estimate_lre, relation_jacobian
from tl_lenses.patchscope import AffineMap, PatchscopeResult, patch_hook, patchscope, source_state
from tl_lenses.patchscope_cross import AffineFit, fit_affine_map
from tl_lenses.patchscope_presets import (
    AttributeResult, GenerationTable, TokenIdentityResult, attribute_extraction,
    chain_of_thought, entity_description, token_identity,
)
from tl_lenses.patchscope_sweep import SweepResult, patchscope_sweep
from tl_lenses.relations import Relation, Sample, get_relation, load_relation, starter_relations
from tl_lenses.lenses.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.lenses.base import Lens, LogitLens
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.models import load_default_model
from tl_lenses.result import LensResult
from tl_lenses.unembed import Unembed

__all__ = [
    "AttributeLens", "attribute_lens", "LRE", "estimate_lre", "relation_jacobian",
    "Relation", "Sample", "get_relation", "load_relation", "starter_relations",
    "AffineMap", "PatchscopeResult", "patch_hook", "patchscope", "source_state",
    "AffineFit", "fit_affine_map", "AttributeResult", "GenerationTable",
    "TokenIdentityResult", "attribute_extraction", "chain_of_thought", "entity_description",
    "token_identity", "SweepResult", "patchscope_sweep",
    "DLAResult", "HeadPathResult", "LogitDirections", "dla", "head_path_dla", "logit_directions",
    "Lens", "LogitLens", "LensCollector", "LensResult", "Unembed",
    "apply_lens", "apply_lens_to_cache", "load_default_model", "logit_lens",
]
