"""The lecture notes' open questions as analyses: one module each, functions returning results.

* :func:`compare_objectives` (``objectives``): why KL? lenses trained with other objectives;
* :func:`retrained_decoders` (``retrained``): a per-layer decoder trained on the next token;
* :func:`current_vs_next` (``current_next``): input token vs next token per layer, copies;
* :func:`residual_drift` (``drift``): CKA / covariance similarity / translator transfer;
* :func:`gradient_alignment` (``alignment``): iterative inference (Belrose et al. Fig. 19);
* :func:`causal_fidelity` (``causal``) and :func:`lre_causality` (``causal_lre``): are lens
  readings causal, and does the attribute lens's causality score discriminate?

Each result is a dataclass with ``to_html()`` and ``save_png(path)``.
"""

from tl_lenses.analysis.alignment import AlignmentResult, gradient_alignment
from tl_lenses.analysis.causal import CausalResult, causal_fidelity
from tl_lenses.analysis.causal_lre import LRECausalityResult, lre_causality
from tl_lenses.analysis.current_next import CurrentNextResult, current_vs_next
from tl_lenses.analysis.drift import DriftResult, linear_cka, residual_drift
from tl_lenses.analysis.objectives import ObjectivesResult, compare_objectives
from tl_lenses.analysis.retrained import RetrainedResult, retrained_decoders

__all__ = [
    "AlignmentResult", "gradient_alignment", "CausalResult", "causal_fidelity",
    "LRECausalityResult", "lre_causality", "CurrentNextResult", "current_vs_next",
    "DriftResult", "linear_cka", "residual_drift", "ObjectivesResult", "compare_objectives",
    "RetrainedResult", "retrained_decoders",
]
