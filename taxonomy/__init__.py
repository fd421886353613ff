"""Category hierarchies: building, reading, writing and embedding vast vocabularies.

`taxonomy` imports none of vastdet's other packages; everything else reads its categories here.
"""

from taxonomy.formats import FORMATS, load_taxonomy, save_taxonomy
from taxonomy.hierarchy import CategoryHierarchy, adaptive_weights
from taxonomy.tree import CycleError, Node, Taxonomy, TaxonomyError

__all__ = [
    "FORMATS",
    "CategoryHierarchy",
    "CycleError",
    "Node",
    "Taxonomy",
    "TaxonomyError",
    "adaptive_weights",
    "load_taxonomy",
    "save_taxonomy",
]
