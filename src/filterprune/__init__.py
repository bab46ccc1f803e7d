"""filterprune: remove whole convolution filters from trained PyTorch CNNs (arXiv 1611.06440).

    pruner = filterprune.Pruner(model, example_inputs, criterion="taylor", ignore=[model.fc])
    pruner.rank(loader, loss_fn)
    result = pruner.prune(512)
    filterprune.profile(pruner.model, example_inputs)
    filterprune.save(pruner.model, "pruned.safetensors")
"""

from .criteria import CRITERIA, Criterion
from .graph import ChannelGraph, GraphError, Group
from .io import export_onnx, load, load_state_dict_file, save
from .measure import Profile, latency_ms, profile
from .models import ModelError, build, three_linear_head, vgg16_layout
from .pruner import PruneResult, Pruner

__all__ = [
    "CRITERIA", "ChannelGraph", "Criterion", "GraphError", "Group", "ModelError", "Profile", "PruneResult", "Pruner", "build",
    "export_onnx", "latency_ms", "load", "load_state_dict_file", "profile", "save", "three_linear_head", "vgg16_layout",
]
