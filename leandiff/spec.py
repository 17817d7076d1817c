"""The spec grammar shared by recipes and runtimes, and typed configs read from dataclasses.

A *spec* is ``name(key=value, ...)``; a recipe is specs joined by ``>``. Grammar (whitespace is free)::

    recipe := step ( ">" step )*
    step   := NAME [ "(" [ arg ( "," arg )* ] ")" ]
    arg    := KEY "=" value
    value  := number | true | false | word | "quoted string"

A step's or a runtime's arguments are the fields of one frozen dataclass (its *config*): names, types
(annotations), defaults, and checks (``__post_init__`` raising :class:`~leandiff.errors.UserError`).
:func:`bind` checks a spec's arguments against it and builds it; :func:`arguments` lists it. A field
whose recipe name is not a Python identifier (``pd(from=...)``) says so in its metadata:
``field(default=256, metadata={"arg": "from"})``. A field without a default must be given.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .errors import MissingExtra, UserError

REQUIRED = object()  # marker default in :func:`arguments`: the argument must be given




class RecipeError(UserError):
    """A malformed recipe: says where (character position) and what was expected."""


@dataclass(frozen=True)
class Step:
    name: str
    args: dict
    pos: int  # character offset of the step's name in the recipe text

    def __str__(self) -> str:
        inner = ",".join(f"{k}={fmt_value(v)}" for k, v in self.args.items())
        return f"{self.name}({inner})"


def fmt_value(v) -> str:
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


# --- typed configs ---------------------------------------------------------------------------------------------------

_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _field_type(cls, f) -> type | tuple:
    hint = _hint(cls, f)
    name = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    if name not in _TYPES:
        raise TypeError(f"{cls.__name__}.{f.name}: a config field is int, float, bool or str, not {name}")
    return _TYPES[name]


def _hint(cls, f):
    return typing.get_type_hints(cls).get(f.name, f.type)


def _fields(cls):
    """The fields a spec may set (``metadata={"recipe": False}`` keeps one for the code, e.g. a seed)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("recipe", True)]


def arg_name(f) -> str:
    return f.metadata.get("arg", f.name)


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _flat(cls) -> list[tuple[str, Any, Any]]:
    """(recipe name, field, inner field) of every argument of a config, in field order. A field whose type is
    itself a config dataclass (a step's nested training settings) is *flattened*: its fields are arguments of
    the outer spec (``kd(s=2,steps=400,lr=1e-3)``, not ``kd(train=(...))``), with the outer field's default
    instance giving their defaults and ``metadata={"rename": {"steps": "steps_per_round"}}`` renaming any.
    Plain fields have inner field None."""
    out = []
    for f in _fields(cls):
        hint = _hint(cls, f)
        if dataclasses.is_dataclass(hint):
            rename = f.metadata.get("rename", {})
            out += [(rename.get(arg_name(g), arg_name(g)), f, g) for g in _fields(hint)]
        else:
            out.append((arg_name(f), f, None))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: argument names repeat after flattening: {names}")
    return out


def arguments(cls) -> dict[str, tuple[Any, type | tuple]]:
    """name -> (default or :data:`REQUIRED`, accepted type(s)) of a config dataclass, in field order."""
    out = {}
    for name, f, g in _flat(cls):
        if g is None:
            out[name] = (_default(f), _field_type(cls, f))
        else:
            inner = _hint(cls, f)
            out[name] = (getattr(_default(f), g.name), _field_type(inner, g))
    return out


def _type_ok(v, want) -> bool:
    want = want if isinstance(want, tuple) else (want,)
    return isinstance(v, want) and not (isinstance(v, bool) and bool not in want)


def bind(cls, args: dict, where: str):
    """``cls`` built from a spec's ``args`` (recipe names): unknown names, wrong types and missing
    arguments are one-line errors naming ``where``; the dataclass's own checks (the nested settings'
    first) run as it is built."""
    flat = {name: (f, g) for name, f, g in _flat(cls)}
    types = arguments(cls)
    kwargs, nested = {}, {}
    for k, v in args.items():
        if k not in flat:
            raise RecipeError(f"{where}: unknown argument {k!r}; accepted: {', '.join(flat) or 'none'}")
        want = types[k][1]
        if not _type_ok(v, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise RecipeError(f"{where}: {k}={fmt_value(v)} should be {names}")
        f, g = flat[k]
        v = float(v) if want == (int, float) else v
        if g is None:
            kwargs[f.name] = v
        else:
            nested.setdefault(f.name, {})[g.name] = v
    missing = [k for k, (d, _) in types.items() if d is REQUIRED and flat[k][0].name not in kwargs]
    if missing:
        raise RecipeError(f"{where}: missing argument(s) {', '.join(missing)}")
    try:
        for name, f, g in _flat(cls):
            if g is not None and f.name in nested and f.name not in kwargs:
                kwargs[f.name] = dataclasses.replace(_default(f), **nested[f.name])
        return cls(**kwargs)
    except MissingExtra as e:  # stays what it is: a study skips what needs the extra
        raise MissingExtra(f"{where}: {e}") from None
    except UserError as e:
        raise RecipeError(f"{where}: {e}") from None


def values(cfg) -> dict:
    """A config's arguments by recipe name, in field order, nested settings flattened (what lineage records
    and specs print)."""
    return {name: getattr(getattr(cfg, f.name), g.name) if g is not None else getattr(cfg, f.name)
            for name, f, g in _flat(type(cfg))}


@dataclass(frozen=True)
class Spec:
    """A registered step or runtime: the function, its config dataclass and a one-line description."""

    fn: Callable
    config: type
    help: str = ""

    @property
    def params(self) -> dict:
        """name -> default (:data:`REQUIRED` when it must be given)."""
        return {k: d for k, (d, _) in arguments(self.config).items()}

    @property
    def types(self) -> dict:
        return {k: t for k, (_, t) in arguments(self.config).items()}

    @property
    def description(self) -> str:
        return self.help or (self.fn.__doc__ or "").strip().split("\n")[0]


@dataclass(frozen=True)
class NoArgs:
    """The config of a step or runtime that takes no arguments."""
