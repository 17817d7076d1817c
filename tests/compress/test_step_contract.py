"""Contract of every recipe step in leandiff.compress.STEPS, as the first step of a recipe on a tiny model:
it leaves its input untouched, records itself in the lineage, and its checkpoint round-trips save → load
with identical outputs. A new step fails here until it has a case."""
import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.recipe import STEPS, apply_recipe, parse_recipe
from leandiff.spec import REQUIRED, RecipeError

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
    "dmd": "dmd(steps=2,batch_size=8,pairs=4,teacher_nfe=2,fake_steps=2)",
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


TRAINING_STEPS = ("finetune", "kd", "lowrank", "lora", "pd", "oneshot", "cd", "dmd")


@pytest.mark.parametrize("name", TRAINING_STEPS)
def test_every_training_step_takes_the_same_training_settings_with_one_precision_default(name):
    """One nested Training per training step, flat in the recipe: every training step accepts each of its
    settings (pd names its length steps_per_round), and bf16 defaults to false everywhere, as in train."""
    from dataclasses import fields

    from leandiff.compress.training import Training
    from leandiff.recipe import config_of

    params = STEPS[name].params
    want = {("steps_per_round" if name == "pd" and f.name == "steps" else f.name) for f in fields(Training)}
    assert want <= set(params), name
    assert params["bf16"] is False
    step = parse_recipe(f"{name}(lr=0.003,bf16=true)")[0]
    cfg = config_of(step)
    assert cfg.train.lr == 0.003 and cfg.train.bf16 is True  # nested, built from the step's own defaults
    assert step.args["lr"] == 0.003 and "train" not in step.args  # and flat again in the lineage record
    with pytest.raises(RecipeError, match=f"step {name} .*learning rate must be positive"):
        parse_recipe(f"{name}(lr=-1)")
