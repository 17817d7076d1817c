"""Contract of every recipe step in leandiff.compress.STEPS, as the first step of a recipe on a tiny model:
it leaves its input untouched, records itself in the lineage, and its checkpoint round-trips save → load
with identical outputs. A new step fails here until it has a case."""
import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.recipe import STEPS, apply_recipe, parse_recipe
from leandiff.spec import REQUIRED

T = "steps=2,batch_size=8,bf16=false"
CASES = {
    "prune": "prune(method=magnitude,ratio=0.5)",
    "finetune": f"finetune({T})",
    "kd": f"kd(s=1,{T})",
    "lowrank": "lowrank(r=2)",
    "lora": f"lora(r=2,{T})",
    "pd": "pd(from=2,to=1,steps_per_round=2,convert_steps=2,batch_size=8)",
    "oneshot": "oneshot(teacher_nfe=2,steps=2,pairs=8,convert_steps=2,batch_size=8)",
    "cd": "cd(steps=2,n=4,batch_size=8)",
    "quant": "quant(n=8,steps=2)",
    "cache": "cache(interval=2)",
}


def test_every_step_has_a_case_and_its_config_is_its_signature():
    assert set(CASES) == set(STEPS)
    for name, spec in STEPS.items():
        assert spec.description, name
        assert all(d is REQUIRED or isinstance(d, spec.types[k]) for k, d in spec.params.items()), name
        parse_recipe(CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_contract(name, tiny_ckpt, image_folder, tmp_path):
    src = tmp_path / "in"
    save_checkpoint(tiny_ckpt, src)
    start = load_checkpoint(src)
    before = {k: v.clone() for k, v in start.net.state_dict().items()}
    out = apply_recipe(start, CASES[name], tmp_path / "out", dataset=f"folder:{image_folder}", progress=False,
                       log=lambda s: None)
    assert all(torch.equal(v, before[k]) for k, v in start.net.state_dict().items())  # input untouched
    rec = out.lineage[-1]
    assert rec["step"] == name and rec["parent"] == start.hash() and rec["recipe"].startswith(name)
    back = load_checkpoint(tmp_path / "out")
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        a, b = out.denoiser().predict(x, t), back.denoiser().predict(x, t)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
