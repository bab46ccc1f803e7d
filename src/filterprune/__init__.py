"""filterprune: remove whole convolution filters from trained PyTorch CNNs (arXiv 1611.06440).

    pruner = filterprune.Pruner(model, example_inputs, criterion="taylor", ignore=[model.fc])
    pruner.rank(loader, loss_fn)
    result = pruner.prune(512)
"""

from .criteria import CRITERIA
from .graph import ChannelGraph, GraphError, Group
from .pruner import PruneResult, Pruner

__all__ = ["CRITERIA", "ChannelGraph", "GraphError", "Group", "PruneResult", "Pruner"]
