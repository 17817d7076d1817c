"""Surgery: structural changes to a network, replayed from the plain-JSON records a checkpoint's
architecture keeps (``arch["surgery"]``), so a pruned, quantized, factorised or adapted network
rebuilds from data alone. Low in the layers: these modules import torch and :mod:`leandiff.errors`
only, never :mod:`leandiff.checkpoint` (which uses them through :func:`leandiff.models.build_network`).

One line per kind: a new surgery is one module plus one entry here.
"""
from . import factor, prune, quant

# kind -> fn(net, record) -> net
SURGERY = {
    "prune": prune.replay_prune,
    "quant": quant.replay_quant,
    "lowrank": factor.replay_lowrank,
    "lora": factor.replay_lora,
}
