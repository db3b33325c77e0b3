"""The attribute lens (Hernandez et al. 2024): linear relational embeddings as lenses.

``lre.py`` (estimate ``LRE(s) = beta W s + b`` from the model's Jacobian), ``lens.py`` (the
attribute lens), ``relations.py`` (relation files and the starter relations),
``metrics.py`` (faithfulness, causality and sweeps), ``io.py``, ``view.py``, ``cli.py``.
"""

from tl_lenses.lenses.attribute.io import load_lre, save_lre
from tl_lenses.lenses.attribute.lens import AttributeLens, attribute_lens
from tl_lenses.lenses.attribute.lre import LRE, estimate_lre, relation_jacobian
from tl_lenses.lenses.attribute.relations import (
                                                  Relation,
                                                  Sample,
                                                  get_relation,
                                                  load_relation,
                                                  starter_relations,
)

__all__ = ["LRE", "AttributeLens", "Relation", "Sample", "attribute_lens", "estimate_lre",
           "get_relation", "load_lre", "load_relation", "relation_jacobian", "save_lre",
           "starter_relations"]
