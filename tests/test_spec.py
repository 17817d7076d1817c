"""The spec grammar's typed configs: nested settings flattened into one argument list (leandiff.spec)."""
from dataclasses import dataclass, field

import pytest

from leandiff.errors import UserError
from leandiff.spec import RecipeError, arguments, bind, values


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    lr: float = 0.1

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class Outer:
    k: int = 1
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5), metadata={"rename": {"steps": "rounds"}})


def test_nested_fields_are_flat_arguments_with_the_outer_defaults():
    assert {k: d for k, (d, _) in arguments(Outer).items()} == {"k": 1, "rounds": 10, "lr": 0.5}
    cfg = bind(Outer, {"rounds": 3}, "outer")
    assert cfg.inner == Inner(steps=3, lr=0.5)  # the outer default's lr is kept
    assert values(cfg) == {"k": 1, "rounds": 3, "lr": 0.5}
    assert bind(Outer, values(cfg), "outer") == cfg


def test_nested_errors_name_the_spec():
    with pytest.raises(RecipeError, match="outer: unknown argument 'steps'"):
        bind(Outer, {"steps": 3}, "outer")  # renamed
    with pytest.raises(RecipeError, match="outer: rounds=x should be int"):
        bind(Outer, {"rounds": "x"}, "outer")
    with pytest.raises(RecipeError, match="outer: lr must be positive"):
        bind(Outer, {"lr": -1}, "outer")


def test_a_name_repeated_after_flattening_is_a_programming_error():
    @dataclass(frozen=True)
    class Clash:
        lr: float = 1.0
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(TypeError, match="repeat"):
        arguments(Clash)
