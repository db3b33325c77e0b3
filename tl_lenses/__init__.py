"""tl_lenses: lenses on the hidden representations of TransformerLens models."""

from tl_lenses.dla import DLAResult, LogitDirections, dla, logit_directions
from tl_lenses.dla_paths import HeadPathResult, head_path_dla
from tl_lenses.lenses.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.lenses.base import Lens, LogitLens
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.models import load_default_model
from tl_lenses.result import LensResult
from tl_lenses.unembed import Unembed

__all__ = [
    "DLAResult", "HeadPathResult", "LogitDirections", "dla", "head_path_dla", "logit_directions",
    "Lens", "LogitLens", "LensCollector", "LensResult", "Unembed",
    "apply_lens", "apply_lens_to_cache", "load_default_model", "logit_lens",
]
