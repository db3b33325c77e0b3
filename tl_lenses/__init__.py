"""tl_lenses: lenses on the hidden representations of TransformerLens models.

One subpackage per method: ``lenses/`` (logit lens; ``tuned/``, ``attribute/``),
``patchscopes/``, ``attribution/`` (direct logit attribution); ``readout/`` is the shared
lens readout, ``analysis/`` the lecture notes' open questions as tools, ``viz/`` the drawing
primitives. The top level holds the entry points and
result types; everything else is one level down, as attributes (``tl_lenses.tuned``,
``tl_lenses.attribute``, ``tl_lenses.patchscopes``, ``tl_lenses.attribution``,
``tl_lenses.readout``, ``tl_lenses.analysis``).
"""

from tl_lenses import analysis, attribution, patchscopes, readout
from tl_lenses.attribution import DLAResult, HeadPathResult, dla, head_path_dla
from tl_lenses.lenses import attribute, tuned
from tl_lenses.lenses.attribute import LRE, attribute_lens, estimate_lre
from tl_lenses.lenses.logit import LogitLens, logit_lens
from tl_lenses.lenses.tuned import TunedLens, evaluate_lenses, token_split, train_tuned_lens
from tl_lenses.models import load_default_model, load_model
from tl_lenses.patchscopes import PatchscopeResult, SweepResult, patchscope, patchscope_sweep
from tl_lenses.readout import Lens, LensCollector, LensResult, apply_lens, apply_lens_to_cache

# Subpackages, reachable as attributes (tll.tuned.save_tuned_lens, tll.patchscopes.patch_hook).
SUBPACKAGES = (analysis, attribute, attribution, patchscopes, readout, tuned)

__all__ = [
    # models and the shared readout
    "load_default_model", "load_model", "Lens", "LensResult", "LensCollector", "apply_lens",
    "apply_lens_to_cache",
    # lenses
    "LogitLens", "logit_lens", "TunedLens", "train_tuned_lens", "token_split", "evaluate_lenses",
    "LRE", "estimate_lre", "attribute_lens",
    # patchscopes
    "PatchscopeResult", "SweepResult", "patchscope", "patchscope_sweep",
    # direct logit attribution
    "DLAResult", "HeadPathResult", "dla", "head_path_dla",
]
