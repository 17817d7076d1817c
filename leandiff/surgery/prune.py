"""Pruned widths: the ``prune`` surgery record gives a freshly built network the recorded tensor shapes
and width attributes (its weights load after)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

# attributes that describe a module's widths; recorded when pruning changes them
WIDTH_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "num_channels", "num_groups",
               "channels", "heads", "inner_dim", "inner_kv_dim", "query_dim", "out_dim")


def replay_prune(net: nn.Module, rec: dict) -> nn.Module:
    """Give a freshly built network the recorded shapes and width attributes (weights load after)."""
    modules = dict(net.named_modules())
    for name, shape in rec["shapes"].items():
        mod_name, _, leaf = name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None:
            raise UserError(f"prune surgery names layer {mod_name!r}, which the network does not have")
        old = getattr(mod, leaf)
        new = torch.empty([int(s) for s in shape], dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(mod, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            mod.register_buffer(leaf, new)
    for mod_name, attrs in rec["attrs"].items():
        if mod_name not in modules:
            raise UserError(f"prune surgery names layer {mod_name!r}, which the network does not have")
        for a, v in attrs.items():
            if a not in WIDTH_ATTRS:
                raise UserError(f"prune surgery: attribute {a!r} is not a width attribute")
            setattr(modules[mod_name], a, int(v))
    return net
