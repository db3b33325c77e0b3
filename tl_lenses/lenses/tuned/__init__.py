"""The tuned lens (Belrose et al. 2023): an affine translator per layer, trained by KL.

``lens.py`` (:class:`TunedLens`), ``train.py`` (the fast and reference recipes),
``eval.py`` (held-out KL, cross-entropy, top-1 agreement per layer), ``io.py`` (save, load,
import the ``tuned-lens`` library's files), ``view.py``, ``cli.py``. Training's parts:
``config.py``, ``loop.py`` (micro-batches, all-reduce, checkpoints), ``kl.py`` (the KL
step), ``least_squares.py`` (the warm start), ``budget.py`` (the clock),
``distributed.py`` (torch.distributed), ``checkpoint.py``, ``checks.py`` (argument checks).
"""

from tl_lenses.data import TokenSplit, token_split
from tl_lenses.lenses.tuned.distributed import close_distributed, init_distributed, local_device
from tl_lenses.lenses.tuned.eval import KLEvaluator, LayerMetrics, LensEvaluation, evaluate_lenses
from tl_lenses.lenses.tuned.io import import_tuned_lens_library, load_tuned_lens, save_tuned_lens
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.train import TrainConfig, TrainResult, train_tuned_lens
from tl_lenses.streams import TensorRows, TokenStream

__all__ = ["KLEvaluator", "LayerMetrics", "LensEvaluation", "TensorRows", "TokenSplit",
           "TokenStream", "TrainConfig", "TrainResult", "TunedLens", "close_distributed",
           "evaluate_lenses", "import_tuned_lens_library", "init_distributed", "load_tuned_lens",
           "local_device", "save_tuned_lens", "token_split", "train_tuned_lens"]
