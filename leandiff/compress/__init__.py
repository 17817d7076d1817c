"""Compression: recipe steps that turn a checkpoint into a leaner one.

:data:`STEPS` is the step registry: one line per step, naming its function
``fn(ckpt, config, ctx) -> ckpt`` and its config dataclass (parameters, types, defaults and checks;
:mod:`leandiff.spec`). A new step is one module plus one line here; the recipe parser, ``leandiff
recipes`` and the contract tests read it from this dict.

- ``finetune``: the training loop on the checkpoint's dataset, optionally distilling from the
  checkpoint as it was before the recipe;
- ``quant``: post-training quantization (fake-quant research path, ONNX Runtime int8, OpenVINO int8 by
  NNCF); calibration collectors in :mod:`.calibration`, ONNX export and int8 in :mod:`.onnx`, OpenVINO in
  :mod:`.openvino`;
- ``prune``: unstructured and structured pruning;
- ``kd``: the KD loss and teacher of every KD-using step, KD into narrower students (:mod:`.kd`);
- ``lowrank``, ``lora``: SVD factors and LoRA adapters (:mod:`.lowrank`);
- ``pd``, ``oneshot``: progressive and one-shot distillation (:mod:`.progressive`);
- every training step trains through one entry, :mod:`.training`;
- ``consistency``: consistency distillation (``cd``) into a one- or few-step consistency model;
- ``dmd``: distribution matching distillation into a one-step generator;
- ``cache``: feature caching (sets the checkpoint's runtime).

The layers the steps insert (quantized layers, low-rank factors, LoRA adapters) and their replay
from a checkpoint's surgery records live in :mod:`leandiff.surgery`, below the checkpoint.
"""
from ..spec import Spec
from . import cache, consistency, dmd, finetune, kd, lowrank, progressive, prune, quant

STEPS: dict[str, Spec] = {
    "prune": Spec(prune.prune_step, prune.PruneConfig),
    "finetune": Spec(finetune.finetune_step, finetune.FinetuneConfig),
    "kd": Spec(kd.kd_step, kd.KDConfig),
    "lowrank": Spec(lowrank.lowrank_step, lowrank.LowRankConfig),
    "lora": Spec(lowrank.lora_step, lowrank.LoRAConfig),
    "pd": Spec(progressive.pd_step, progressive.PDConfig),
    "oneshot": Spec(progressive.oneshot_step, progressive.OneShotConfig),
    "cd": Spec(consistency.cd_step, consistency.CDConfig),
    "dmd": Spec(dmd.dmd_step, dmd.DMDConfig),
    "quant": Spec(quant.quant_step, quant.QuantStep,
                  "post-training quantization: fake-quant simulation (any bits) or real int8 via ONNX Runtime or OpenVINO"),
    "cache": Spec(cache.cache_step, cache.CacheSpec),
}
