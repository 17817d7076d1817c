"""`leandiff bench` writes only where --out says; real-vs-real floors are drawn from distinct images."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from leandiff.cli import main
from leandiff.errors import UserError
from leandiff.evaluate.metrics import distinct_draw
from conftest import saved_mnist_unet


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny UNet saved to disk (bench takes checkpoint paths)."""
    return saved_mnist_unet(tmp_path_factory.mktemp("ckpt"), sample_size=8, timesteps=None)


def _bench(ckpt, *extra):
    return CliRunner().invoke(main, ["bench", ckpt, "--batch-sizes", "1", "--rounds", "1", *extra])


def test_bench_without_out_prints_and_writes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _bench(tiny_ckpt)
    assert r.exit_code == 0, r.output
    assert "ms/eval @1" in r.output
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_where_out_says(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sub" / "cost.md"
    r = _bench(tiny_ckpt, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["cost.json", "cost.md"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["runtime"] == "eager"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # nothing beside it in the working directory


def test_floor_draws_are_distinct_and_never_resampled():
    images = torch.arange(10.0).reshape(10, 1, 1, 1)
    x = distinct_draw(images, 7, seed=3)
    assert x.shape[0] == 7 and len(set(x.flatten().tolist())) == 7
    assert torch.equal(x, distinct_draw(images, 7, seed=3))  # seeded
    assert len(set(distinct_draw(images, 10).flatten().tolist())) == 10
    with pytest.raises(UserError, match="needs 11 distinct images; the pool has 10"):
        distinct_draw(images, 11)


def test_every_card_states_a_distinct_floor_and_its_n():
    """Every shipped model card names its floor's N, that its images are distinct (no replacement),
    and, where that N differs from the N of the rows, says so."""
    from pathlib import Path

    import leandiff

    cards = sorted((Path(leandiff.__file__).parent / "zoo").glob("*/card.json"))
    assert cards
    for p in cards:
        floor = json.loads(p.read_text())["real_vs_real_floor"]
        assert floor["with_replacement"] is False and floor["distinct"] == floor["n"], p
        text = (p.parent / "CARD.md").read_text()
        assert f"N={floor['n']}" in text and "distinct" in text, p
