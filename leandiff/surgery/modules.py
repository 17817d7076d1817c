"""Module lookup by dotted name, shared by every surgery and the steps that make them."""
from __future__ import annotations

from torch import nn

from ..errors import UserError


def get_module(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise UserError(f"architecture record names layer {name!r}, which the network does not have") from None


def set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)
