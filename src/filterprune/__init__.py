"""filterprune: remove whole convolution filters from trained PyTorch CNNs (arXiv 1611.06440).

    pruner = filterprune.Pruner(model, example_inputs, criterion="taylor", ignore=[model.fc])
    pruner.rank(loader, loss_fn)
    result = pruner.prune(512)
    filterprune.profile(pruner.model, example_inputs)
    filterprune.save(pruner.model, "pruned.safetensors")
"""

from .auto import Plan, prune_auto
from .criteria import CRITERIA, Criterion
from .graph import ChannelGraph, GraphError, Group
from .export import export_model, export_onnx
from .io import load, load_state_dict_file, save
from .measure import Profile, latency_ms, profile, speed_change
from .models import ModelError, build, three_linear_head
from .recipes.vgg import vgg16_layout  # the demo's network; importing it registers build("vgg16_layout")
from .pruner import PruneResult, Pruner
from .schedule import Schedule, prune_iteratively

__all__ = [
    "CRITERIA", "ChannelGraph", "Criterion", "GraphError", "Group", "ModelError", "Plan", "Profile", "PruneResult", "Pruner",
    "Schedule", "build", "export_model", "export_onnx", "latency_ms", "load", "load_state_dict_file", "profile", "prune_auto",
    "prune_iteratively", "save",
    "speed_change", "three_linear_head", "vgg16_layout",
]
