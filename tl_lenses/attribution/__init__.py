"""Direct logit attribution over heads, MLPs, neurons and head paths.

``core.py`` (:func:`dla`: a logit split over every residual-stream writer), ``directions.py``
(which logit is attributed), ``paths.py``
(:func:`head_path_dla`: paths through a head's OV circuit), ``result.py``
(:class:`DLAResult`), ``identity.py`` (the exact sums every result is checked against),
``provenance.py`` (which model a result came from), ``view.py``, ``cli.py``.
"""

from tl_lenses.attribution.core import LogitDirections, dla, logit_directions
from tl_lenses.attribution.paths import HeadPathResult, head_path_dla
from tl_lenses.attribution.result import DLAResult

__all__ = ["DLAResult", "HeadPathResult", "LogitDirections", "dla", "head_path_dla",
           "logit_directions"]
