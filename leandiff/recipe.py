"""Compression recipes: ``step(key=value, ...) > step(...) > ...`` applied to a checkpoint.

A recipe is a chain of registered steps (prune, finetune, kd, lowrank, pd, quant, cache, ...).
Each step is a function ``(Checkpoint, args, StepContext) -> Checkpoint`` registered with
:func:`register_step` together with the arguments it accepts, so a recipe is checked completely
(names, argument names, types) before any work starts.

Grammar (whitespace is free)::

    recipe := step ( ">" step )*
    step   := NAME [ "(" [ arg ( "," arg )* ] ")" ]
    arg    := KEY "=" value
    value  := number | true | false | word | "quoted string"

:func:`apply_recipe` runs the steps in order. Step ``i`` writes its checkpoint to
``OUT/.steps/<i>-<name>/``; a killed ``compress`` resumes after the last finished step (a step
is finished when its directory holds a ``done.json`` naming the same recipe prefix). The final
checkpoint is copied to ``OUT``; every step is recorded in the checkpoint's lineage with its
arguments and its parent's weights hash.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .io import atomic_path, read_json, write_json

REQUIRED = object()
_STEP_BOOKKEEPING = {"done.json", "started.json", "train_state.safetensors"}  # not copied to OUT  # marker default: the argument must be given


class RecipeError(UserError):
    """A malformed recipe: says where (character position) and what was expected."""


@dataclass(frozen=True)
class Step:
    name: str
    args: dict
    pos: int  # character offset of the step's name in the recipe text

    def __str__(self) -> str:
        inner = ",".join(f"{k}={_fmt(v)}" for k, v in self.args.items())
        return f"{self.name}({inner})"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    # quote a string that is not a bare word, or that would read back as a number or a boolean
    if isinstance(v, str) and (not re.fullmatch(r"[A-Za-z0-9_.:/+\-]+", v) or _value("word", v) != v):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<word>[A-Za-z0-9_.:/+\-]+)|(?P<sym>[()=,>])|(?P<bad>\S))""")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _tokens(text: str):
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:  # only whitespace left
            yield ("end", None, len(text))
            return
        kind = m.lastgroup
        yield (kind, m.group(kind), m.start(kind))
        pos = m.end()


def _value(kind: str, tok: str):
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", tok[1:-1])
    low = tok.lower()
    if low in ("true", "false"):
        return low == "true"
    if _NUMBER.fullmatch(tok):
        return int(tok) if re.fullmatch(r"[+-]?\d+", tok) else float(tok)
    return tok


def parse(text: str) -> list[Step]:
    """Parse a recipe string into steps (syntax only; see :func:`check` for names and arguments)."""
    if not isinstance(text, str) or not text.strip():
        raise RecipeError("recipe is empty: expected step(...) > step(...)")
    toks = list(_tokens(text))
    i = 0

    def fail(what: str, at: int):
        kind, tok, pos = toks[at]
        got = "end of recipe" if kind == "end" else repr(tok)
        raise RecipeError(f"recipe: at position {pos + 1}: expected {what}, got {got}  [{text}]")

    steps: list[Step] = []
    while True:
        kind, tok, pos = toks[i]
        if kind != "word" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", tok):
            fail("a step name", i)
        name, start, args = tok, pos, {}
        i += 1
        if toks[i][1] == "(" and toks[i][0] == "sym":
            i += 1
            if not (toks[i][0] == "sym" and toks[i][1] == ")"):
                while True:
                    k_kind, key, k_pos = toks[i]
                    if k_kind != "word" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                        fail("an argument name", i)
                    if key in args:
                        raise RecipeError(f"recipe: at position {k_pos + 1}: argument {key!r} given twice  [{text}]")
                    i += 1
                    if toks[i] [:2] != ("sym", "="):
                        fail(f"'=' after {key}", i)
                    i += 1
                    v_kind, v_tok, _ = toks[i]
                    if v_kind not in ("word", "str"):
                        fail(f"a value for {key}", i)
                    args[key] = _value(v_kind, v_tok)
                    i += 1
                    if toks[i][:2] == ("sym", ","):
                        i += 1
                        continue
                    if toks[i][:2] == ("sym", ")"):
                        break
                    fail("',' or ')'", i)
            i += 1  # past ')'
        steps.append(Step(name, args, start))
        if toks[i][0] == "end":
            return steps
        if toks[i][:2] != ("sym", ">"):
            fail("'>' between steps or the end of the recipe", i)
        i += 1


# --- the step registry ---------------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: Callable
    params: dict  # name -> default (REQUIRED if it must be given); the default's type is the argument's type
    types: dict  # name -> type or tuple of types; from the defaults unless given
    help: str = ""
    validate: Callable | None = None  # validate(args) raises UserError on bad values, at parse time


STEPS: dict[str, StepSpec] = {}


def register_step(name: str, params: dict[str, Any], *, types: dict | None = None, help: str = "",
                  validate: Callable | None = None):
    """Decorator: register ``fn(ckpt, args, ctx) -> ckpt`` as recipe step ``name``.

    ``params`` maps each accepted argument to its default (:data:`REQUIRED` when there is none);
    the argument's type is taken from the default (an int default also accepts nothing but ints;
    a float default accepts ints) unless ``types`` says otherwise. ``fn`` receives ``args`` with
    every default filled in. ``validate(args)``, when given, checks the values (a method's name,
    a ratio's range) when the recipe is parsed, so a bad last step fails before the first runs.
    """
    types = dict(types or {})
    for k, d in params.items():
        if k not in types:
            if d is REQUIRED or d is None:
                types[k] = (int, float, str, bool)
            elif isinstance(d, bool):
                types[k] = bool
            elif isinstance(d, float):
                types[k] = (int, float)
            else:
                types[k] = type(d)

    def deco(fn):
        if name in STEPS and STEPS[name].fn is not fn:
            raise ValueError(f"recipe step {name!r} is already registered")
        STEPS[name] = StepSpec(name, fn, dict(params), types, help or (fn.__doc__ or "").strip().split("\n")[0],
                               validate)
        return fn

    return deco


def _load_steps() -> None:
    """Import the modules that register steps (each stage registers its own)."""
    import importlib

    for mod in ("leandiff.compress.quant", "leandiff.compress.prune", "leandiff.compress.distill",
                "leandiff.compress.cache", "leandiff.compress.finetune"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but one of its imports is missing: a real error
                raise


def check(steps: list[Step]) -> list[Step]:
    """Check step names and arguments against the registry; returns the steps with defaults filled."""
    _load_steps()
    out = []
    for st in steps:
        spec = STEPS.get(st.name)
        if spec is None:
            raise RecipeError(f"recipe: at position {st.pos + 1}: unknown step {st.name!r}; "
                              f"known: {', '.join(sorted(STEPS)) or 'none'}")
        args = {}
        for k, v in st.args.items():
            if k not in spec.params:
                raise RecipeError(f"recipe: step {st.name} (position {st.pos + 1}): unknown argument {k!r}; "
                                  f"accepted: {', '.join(spec.params) or 'none'}")
            want = spec.types[k]
            ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in (want if isinstance(want, tuple) else (want,)))
            if not ok:
                names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
                raise RecipeError(f"recipe: step {st.name} (position {st.pos + 1}): {k}={_fmt(v)} should be {names}")
            args[k] = float(v) if want == (int, float) and not isinstance(v, bool) else v
        missing = [k for k, d in spec.params.items() if d is REQUIRED and k not in args]
        if missing:
            raise RecipeError(f"recipe: step {st.name} (position {st.pos + 1}): missing argument(s) {', '.join(missing)}")
        for k, d in spec.params.items():
            args.setdefault(k, None if d is REQUIRED else d)
        if spec.validate is not None:
            try:
                spec.validate(args)
            except UserError as e:
                raise RecipeError(f"recipe: step {st.name} (position {st.pos + 1}): {e}") from None
        out.append(Step(st.name, args, st.pos))
    return out


def parse_recipe(text: str) -> list[Step]:
    """Parse and check: the steps to run, defaults filled in."""
    return check(parse(text))


# --- running a recipe ----------------------------------------------------------------------------------------------

def apply_recipe(ckpt, recipe: str | list[Step], out_dir: str | Path, *, dataset: str | None = None,
                 data_dir: str | None = None, seed: int = 0, progress: bool | None = None,
                 log: Callable[[str], None] = print):
    """Run every step on ``ckpt``; write the result to ``out_dir`` (resuming finished steps)."""
    from .checkpoint import load_checkpoint, save_checkpoint

    steps = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    out_dir = Path(out_dir)
    work = out_dir / ".steps"
    lead, sync = _ranks()  # under torchrun: rank 0 alone writes, every rank trains
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
        if done.is_file() and {k: read_json(done).get(k) for k in stamp} == stamp:
            ckpt = load_checkpoint(d)
            log(f"[{i + 1}/{len(steps)}] {st} already done ({d})")
            continue
        started = d / "started.json"
        if lead:
            if d.exists() and not (started.is_file() and read_json(started) == stamp):
                shutil.rmtree(d)  # left by a different recipe: start this step afresh
            d.mkdir(parents=True, exist_ok=True)  # same recipe, killed mid-step: the step may resume
            write_json(started, stamp)
            log(f"[{i + 1}/{len(steps)}] {st}")
        sync()
        parent = ckpt.hash()
        ctx = StepContext(step_dir=d, dataset=dataset, data_dir=data_dir, seed=seed, progress=progress,
                          index=i, steps=steps, origin=origin_ckpt)
        ckpt = STEPS[st.name].fn(ckpt, dict(st.args), ctx)
        ckpt.meta.setdefault("dataset", dataset)
        ckpt.lineage.append({"step": st.name, "args": st.args, "parent": parent, "recipe": str(st)})
        if lead:
            save_checkpoint(ckpt, d)
        sync()
        ckpt = load_checkpoint(d)  # what later steps see is exactly what was written
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
    return load_checkpoint(out_dir)


def _ranks():
    """(is this the writing process, barrier) — under torchrun (WORLD_SIZE > 1) rank 0 writes the
    step directories and the others wait for it at each barrier (gloo); otherwise (True, no-op)."""
    import os

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return True, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank() == 0, dist.barrier
