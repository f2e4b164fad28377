"""Graph passes, one per file, each named by what it does. PASSES maps the name used by the CLI to the class."""
from .eliminate_dead_nodes import EliminateDeadNodes
from .eliminate_softmax_before_argmax import EliminateSoftmaxBeforeArgmax
from .fuse_draft_top_k_sampling import FuseDraftTopKSampling
from .fuse_gumbel_sampling import FuseGumbelSampling
from .fuse_recycle_chain import FuseRecycleChain
from .merge_forwards import MergeForwards

PASSES = {p.name: p for p in (EliminateSoftmaxBeforeArgmax, FuseGumbelSampling, FuseDraftTopKSampling,
                              FuseRecycleChain, MergeForwards, EliminateDeadNodes)}

__all__ = ["PASSES", "EliminateDeadNodes", "EliminateSoftmaxBeforeArgmax", "FuseDraftTopKSampling",
           "FuseGumbelSampling", "FuseRecycleChain", "MergeForwards"]
