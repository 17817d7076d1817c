"""Property-based fuzzing (hypothesis) of the two parsers that read user files and text: the recipe
parser and the checkpoint loader. Whatever the input, the only exception is a UserError (one line
at the CLI); valid recipes survive a print/parse round trip."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.errors import UserError
from leandiff.recipe import STEPS, RecipeError, Step, check, parse, parse_recipe

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- recipes --------------------------------------------------------------------------------------------

RECIPE_ALPHABET = "abcdefgkpqrstuwz_-0123456789.eE+:/ ()=,>\"\\'\t;"
recipe_like = st.text(alphabet=RECIPE_ALPHABET, max_size=60)


@FUZZ
@given(st.one_of(st.text(max_size=80), recipe_like))
@example("finetune(steps=1)>")
@example('quant(w="8)')
@example("finetune(steps=1,,)")
@example(">")
@example("finetune(steps=1e999)")
def test_recipe_parser_raises_only_recipe_errors(text):
    try:
        parse_recipe(text)
    except RecipeError as e:
        assert "\n" not in str(e) or text.count("\n") > 0  # the message quotes the recipe, nothing more
    except UserError:
        pass


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,8}", fullmatch=True)
keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
tricky_text = st.text(alphabet="0123456789.+-eE truefalsTRUE\"\\,()=>", max_size=8)  # look like other values
values = st.one_of(st.integers(-10**12, 10**12), st.booleans(), st.text(max_size=12), tricky_text,
                   st.floats(allow_nan=False, allow_infinity=False))
steps = st.builds(lambda n, a: (n, a), names, st.dictionaries(keys, values, max_size=4))


def _typed(args: dict) -> dict:
    return {k: (type(v), v) for k, v in args.items()}


@FUZZ
@given(st.lists(steps, min_size=1, max_size=4), st.sampled_from([">", " > ", "\t>\n"]))
@example([("quant", {"calib": "8", "mode": "true", "path": "a\\b", "q": 'say "hi"'})], ">")
def test_printed_recipes_parse_back_to_the_same_steps(chain, sep):
    text = sep.join(str(Step(n, a, 0)) for n, a in chain)
    back = parse(text)
    assert [(s.name, _typed(s.args)) for s in back] == [(n, _typed(a)) for n, a in chain], text


def _registered():
    return sorted(STEPS)


def _arg_value(types):
    types = types if isinstance(types, tuple) else (types,)
    options = []
    if bool in types:
        options.append(st.booleans())
    if int in types:
        options.append(st.integers(-10**6, 10**6))
    if float in types:
        options.append(st.floats(-1e6, 1e6, allow_nan=False))
    if str in types:
        options.append(st.text(max_size=10))
    return st.one_of(options)


@st.composite
def registered_recipe(draw):
    chain = []
    for name in draw(st.lists(st.sampled_from(_registered()), min_size=1, max_size=3)):
        spec = STEPS[name]
        chosen = draw(st.lists(st.sampled_from(sorted(spec.params)), unique=True, max_size=4)) if spec.params else []
        chain.append(Step(name, {k: draw(_arg_value(spec.types[k])) for k in chosen}, 0))
    return chain


@FUZZ
@given(registered_recipe())
def test_checked_recipes_round_trip_through_their_text(chain):
    try:
        checked = check(chain)
    except RecipeError:  # a required argument not drawn
        return
    text = " > ".join(str(s) for s in checked)
    again = parse_recipe(text)
    assert [(s.name, _typed(s.args)) for s in again] == [(s.name, _typed(s.args)) for s in checked], text


# --- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    """The bytes of a valid tiny checkpoint (weights file with embedded metadata, and its JSON)."""
    from leandiff.checkpoint import Checkpoint
    from leandiff.models import build_network
    from leandiff.schedule import Schedule

    arch = {"type": "diffusers.UNet2DModel", "config": dict(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=[4, 8],
        norm_num_groups=4, down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"])}
    torch.manual_seed(0)
    d = save_checkpoint(Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule("linear", 50),
                                   meta={"dataset": "test"}), tmp_path_factory.mktemp("ck") / "ck")
    return (d / "model.safetensors").read_bytes(), (d / "leandiff.json").read_text()


def _load_only_user_errors(path: Path) -> None:
    try:
        load_checkpoint(path)
    except UserError as e:
        assert str(e).strip()


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".safetensors", ".pt", ".pth", ".ckpt"]))
def test_loader_on_random_bytes_raises_only_user_errors(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"model{suffix}"
        p.write_bytes(data)
        _load_only_user_errors(p)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("splice"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
)


def _mutate(raw: bytes, muts) -> bytes:
    b = bytearray(raw)
    for kind, at, arg in muts:
        at = at % max(1, len(b))
        if kind == "flip" and b:
            b[at] ^= arg
        elif kind == "truncate":
            del b[at:]
        elif kind == "splice":
            b[at:at] = arg
    return bytes(b)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_loader_on_mutated_safetensors_raises_only_user_errors(good_files, muts, header_only):
    raw, _ = good_files
    n = int.from_bytes(raw[:8], "little")  # the JSON header's length: aim most mutations at the header
    if header_only:
        muts = [(k, 8 + at % n, arg) for k, at, arg in muts]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.safetensors"
        p.write_bytes(_mutate(raw, muts))
        _load_only_user_errors(p)


# small numbers only: a config asking for a million channels would really allocate them
json_values = st.recursive(st.none() | st.booleans() | st.integers(-64, 64) | st.floats(-64, 64)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.data())
def test_loader_on_edited_metadata_raises_only_user_errors(good_files, data):
    """A checkpoint directory whose leandiff.json has one field replaced by arbitrary JSON
    (architecture config, schedule, parameterization, ...): loads, or a UserError."""
    raw, meta_text = good_files
    meta = json.loads(meta_text)
    paths = [p for p in _paths(meta) if p]
    where = data.draw(st.sampled_from(paths))
    new = data.draw(json_values)
    obj = meta
    for k in where[:-1]:
        obj = obj[k]
    obj[where[-1]] = new
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(raw)
        (Path(d) / "leandiff.json").write_text(json.dumps(meta))
        _load_only_user_errors(Path(d))
