"""tl_lenses: lenses on the hidden representations of TransformerLens models.

One file per method: ``lenses/`` (logit, tuned, attribute lens), ``patchscope*.py``,
``dla*.py``; ``readout.py`` and ``result.py`` are the shared lens readout; ``viz/`` the views.
"""

from tl_lenses.dla import DLAResult, LogitDirections, dla, logit_directions
from tl_lenses.dla_paths import HeadPathResult, head_path_dla
from tl_lenses.lenses.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.lenses.attribute import AttributeLens, attribute_lens
from tl_lenses.lenses.base import Lens, LogitLens
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.lenses.tuned import TunedLens
from tl_lenses.lre import LRE, estimate_lre, relation_jacobian
from tl_lenses.lre_io import load_lre, save_lre
from tl_lenses.models import load_default_model
from tl_lenses.patchscope import AffineMap, PatchscopeResult, patch_hook, patchscope, source_state
from tl_lenses.patchscope_cross import AffineFit, fit_affine_map
from tl_lenses.patchscope_presets import (
    AttributeResult, GenerationTable, TokenIdentityResult, attribute_extraction,
    chain_of_thought, entity_description, token_identity,
)
from tl_lenses.patchscope_sweep import SweepResult, patchscope_sweep
from tl_lenses.relations import Relation, Sample, get_relation, load_relation, starter_relations
from tl_lenses.result import LensResult
from tl_lenses.data import TokenSplit, read_text_files, token_split
from tl_lenses.tuned_eval import KLEvaluator, LayerMetrics, LensEvaluation, evaluate_lenses
from tl_lenses.tuned_io import import_tuned_lens_library, load_tuned_lens, save_tuned_lens
from tl_lenses.tuned_train import TrainConfig, TrainResult, train_tuned_lens
from tl_lenses.unembed import Unembed

__all__ = [
    # models and the shared readout
    "load_default_model", "Unembed", "Lens", "LensResult", "LensCollector",
    "apply_lens", "apply_lens_to_cache",
    # logit lens
    "LogitLens", "logit_lens",
    # tuned lens
    "TunedLens", "train_tuned_lens", "TrainConfig", "TrainResult", "token_split",
    "TokenSplit", "read_text_files", "evaluate_lenses", "LensEvaluation", "LayerMetrics",
    "KLEvaluator", "save_tuned_lens", "load_tuned_lens", "import_tuned_lens_library",
    # attribute lens
    "AttributeLens", "attribute_lens", "LRE", "estimate_lre", "relation_jacobian",
    "save_lre", "load_lre",
    "Relation", "Sample", "get_relation", "load_relation", "starter_relations",
    # patchscopes
    "AffineMap", "PatchscopeResult", "patch_hook", "patchscope", "source_state",
    "AffineFit", "fit_affine_map", "AttributeResult", "GenerationTable",
    "TokenIdentityResult", "attribute_extraction", "chain_of_thought", "entity_description",
    "token_identity", "SweepResult", "patchscope_sweep",
    # direct logit attribution
    "DLAResult", "HeadPathResult", "LogitDirections", "dla", "head_path_dla",
    "logit_directions",
]
