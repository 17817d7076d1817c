"""Compression recipes: ``step(key=value, ...) > step(...) > ...`` applied to a checkpoint.

A recipe is a chain of steps (prune, finetune, kd, lowrank, pd, quant, cache, ...) from the registry
:data:`leandiff.compress.STEPS`. Each step is a function ``(Checkpoint, config, StepContext) -> Checkpoint``
with one frozen config dataclass that is its signature (names, types, defaults, checks), so a recipe is
checked completely before any work starts. The grammar is :mod:`leandiff.spec`'s.

:func:`apply_recipe` runs the steps in order. Step ``i`` writes its checkpoint to
``OUT/.steps/<i>-<name>/``; a killed ``compress`` resumes after the last finished step (a step
is finished when its directory holds a ``done.json`` naming the same recipe prefix). The final
checkpoint is copied to ``OUT``; every step is recorded in the checkpoint's lineage with its
arguments and its parent's weights hash.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checkpoint import load_checkpoint, save_checkpoint
from .compress import STEPS
from .device import device_of, resolve_device
from .distributed import lead_and_barrier
from .errors import UserError
from .io import atomic_path, read_json, write_json
from .spec import RecipeError, Step, bind, parse, values  # noqa: F401  (the grammar lives in leandiff.spec)

_STEP_BOOKKEEPING = {"done.json", "started.json", "train_state.safetensors"}  # not copied to OUT


# --- checking a recipe ---------------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What a step may use besides the checkpoint: where to write, the data, the seed."""

    step_dir: Path  # the step's output directory; side files (ONNX models, scales) go here
    dataset: str | None = None
    data_dir: str | None = None
    seed: int = 0
    progress: bool | None = None  # None: progress bars only on a terminal
    index: int = 0  # position of the step in the recipe
    steps: list = field(default_factory=list)  # the whole recipe (a step may look at what follows)
    origin: object = None  # the checkpoint before the first step (the teacher of KD fine-tuning)


def check(steps: list[Step]) -> list[Step]:
    """Check step names and arguments against each step's config; returns the steps with every argument
    (defaults filled in, in the config's field order after the given ones)."""
    out = []
    for st in steps:
        spec = STEPS.get(st.name)
        if spec is None:
            raise RecipeError(f"recipe: at position {st.pos + 1}: unknown step {st.name!r}; "
                              f"known: {', '.join(sorted(STEPS)) or 'none'}")
        cfg = bind(spec.config, st.args, f"recipe: step {st.name} (position {st.pos + 1})")
        full = values(cfg)
        out.append(Step(st.name, {**{k: full[k] for k in st.args}, **full}, st.pos))
    return out


def config_of(st: Step):
    """The checked step's config dataclass (its arguments bound to its step's config)."""
    return bind(STEPS[st.name].config, st.args, f"recipe: step {st.name} (position {st.pos + 1})")


def parse_recipe(text: str) -> list[Step]:
    """Parse and check: the steps to run, defaults filled in."""
    return check(parse(text))


# --- running a recipe ----------------------------------------------------------------------------------------------

def _stamp_matches(saved: dict, steps: list[Step], origin: str) -> bool:
    """Whether a step directory's stamp (``started.json`` / ``done.json``) was written for these steps on
    this origin. The recipe prefixes are compared as checked arguments, not as text: a stamp written before
    a step gained a setting (absent there, so at its default when read back now) still matches, and a run
    resumed under a newer leandiff keeps its work. A saved prefix that no longer parses does not match."""
    saved_steps = saved.get("recipe")
    if saved.get("origin") != origin or not isinstance(saved_steps, list) or len(saved_steps) != len(steps) \
            or not all(isinstance(x, str) for x in saved_steps):
        return False
    try:
        old = parse_recipe(" > ".join(saved_steps))
    except UserError:
        return False
    return all(a.name == b.name and a.args == b.args for a, b in zip(old, steps))


def apply_recipe(ckpt, recipe: str | list[Step], out_dir: str | Path, *, dataset: str | None = None,
                 data_dir: str | None = None, seed: int = 0, progress: bool | None = None,
                 log: Callable[[str], None] = print, device: str | None = None):
    """Run every step on ``ckpt``; write the result to ``out_dir`` (resuming finished steps). Every step
    computes on ``device`` (a leandiff.device spec; None: where ``ckpt.net`` is): the checkpoint, each
    step's result and a KD teacher live there; the files written are device-free."""
    steps = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    dev = resolve_device(device) if device is not None else device_of(ckpt.net)
    ckpt.net.to(dev)
    out_dir = Path(out_dir)
    work = out_dir / ".steps"
    lead, sync = lead_and_barrier()  # under torchrun: rank 0 alone writes, every rank trains
    if lead:
        work.mkdir(parents=True, exist_ok=True)
    sync()
    dataset = dataset or ckpt.meta.get("dataset") or ckpt.meta.get("train", {}).get("dataset")
    data_dir = data_dir or ckpt.meta.get("train", {}).get("data_dir")
    origin, origin_ckpt = ckpt.hash(), ckpt
    for i, st in enumerate(steps):
        d = work / f"{i:02d}-{st.name}"
        prefix = [str(s) for s in steps[: i + 1]]
        done = d / "done.json"
        stamp = {"recipe": prefix, "origin": origin}
        if done.is_file() and _stamp_matches(read_json(done), steps[: i + 1], origin):
            ckpt = load_checkpoint(d, dev)
            log(f"[{i + 1}/{len(steps)}] {st} already done ({d})")
            continue
        started = d / "started.json"
        if lead:
            if d.exists() and not (started.is_file() and _stamp_matches(read_json(started), steps[: i + 1], origin)):
                shutil.rmtree(d)  # left by a different recipe: start this step afresh
            d.mkdir(parents=True, exist_ok=True)  # same recipe, killed mid-step: the step may resume
            write_json(started, stamp)
            log(f"[{i + 1}/{len(steps)}] {st}")
        sync()
        parent = ckpt.hash()
        ctx = StepContext(step_dir=d, dataset=dataset, data_dir=data_dir, seed=seed, progress=progress,
                          index=i, steps=steps, origin=origin_ckpt)
        ckpt = STEPS[st.name].fn(ckpt, config_of(st), ctx)
        ckpt.meta.setdefault("dataset", dataset)
        ckpt.lineage.append({"step": st.name, "args": st.args, "parent": parent, "recipe": str(st)})
        if lead:
            save_checkpoint(ckpt, d)
        sync()
        ckpt = load_checkpoint(d, dev)  # what later steps see is exactly what was written
        if lead:
            write_json(done, {"recipe": prefix, "origin": origin, "weights": ckpt.hash()})
        sync()
    final = work / f"{len(steps) - 1:02d}-{steps[-1].name}"
    if lead:
        for f in sorted(final.iterdir()):
            if f.is_file() and f.name not in _STEP_BOOKKEEPING and not f.name.startswith("."):  # .tmp of a killed write
                with atomic_path(out_dir / f.name) as tmp:
                    shutil.copyfile(f, tmp)
    sync()
    return load_checkpoint(out_dir, dev)
