"""Compression: recipe steps that turn a checkpoint into a leaner one.

Each module registers its recipe steps (:func:`leandiff.recipe.register_step`), the runtimes it
brings (:func:`leandiff.runtime.register_runtime`) and the structural changes it makes to the
architecture record (:func:`leandiff.models.register_surgery`):

- ``finetune``: ``finetune(steps=N[, kd=true, kd_frac=0.7, lr=...])`` — the training loop on the
  checkpoint's dataset, optionally distilling from the checkpoint as it was before the recipe;
- ``quant``: post-training quantization (fake-quant research path, ONNX Runtime int8);
- ``prune``: unstructured and structured pruning;
- ``distill``: KD into narrower students, low-rank / LoRA, progressive and one-shot distillation;
- ``cache``: feature caching.
"""
