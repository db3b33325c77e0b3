"""The shared readout engine behind every lens: residuals in, :class:`LensResult` out.

``apply_lens`` runs a model and reads hook points through a lens; ``apply_lens_to_cache``
reads an existing cache; ``LensCollector`` does it as hook functions in your own forward
pass. ``read_lens`` is the chunked engine itself; ``Unembed`` the final norm + unembedding
applied functionally. The per-row statistics' C kernel is private to this package.
"""

from tl_lenses.readout.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.readout.engine import read_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.result import LensResult
from tl_lenses.readout.unembed import Unembed

__all__ = ["Lens", "LensCollector", "LensResult", "Unembed", "apply_lens", "apply_lens_to_cache",
           "read_lens"]
