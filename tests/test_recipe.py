"""Recipes (leandiff.recipe): the steps' texts parse and are checked whole before any step runs."""
import pytest

from leandiff.recipe import RecipeError, parse_recipe


def test_issue_recipes_parse():
    for text in ["kd(s=2,kd_frac=0.7,steps=100)", "lowrank(r=2) > kd(s=1,steps=100)",
                 "pd(from=256,to=4,steps_per_round=100)", "oneshot(teacher_nfe=50,steps=100)",
                 "lora(r=4,steps=10,merge=false)"]:
        assert parse_recipe(text)


@pytest.mark.parametrize("bad, says", [
    ("kd(s=0)", "s must be >= 1"), ("kd(init=copy)", "init must be slice or scratch"),
    ("kd(kd_frac=1.5,steps=5)", "kd_frac must be in"), ("kd(steps=5,schedule=step)", "lr schedule"),
    ("lowrank(r=0.5)", "r must be >= 1"), ("lowrank(r=2,steps=5,lr=0)", "learning rate must be positive"),
    ("lora(r=0,steps=1)", "r must be >= 1"), ("lora(alpha=-1)", "alpha must be >= 0"),
    ("lora(steps=5,batch_size=0)", "batch size must be positive"),
    ("pd(from=6,to=4)", "power of two"), ("pd(steps_per_round=0)", "steps_per_round"),
    ("pd(param=eps)", "must predict one of"), ("pd(weighting=snr)", "weighting must be one of"),
    ("pd(spacing=even)", "unknown timestep spacing"), ("pd(ema_decay=1.0)", "EMA decay"),
    ("oneshot(pairs=0)", "must be >= 1"), ("oneshot(convert_steps=-1)", "convert_steps"),
    ("cache(interval=0)", "interval must be"),
    ("cache(schedule=random)", "schedule must be one of"),
    ("finetune(steps=5,lr=-1)", "learning rate must be positive"), ("finetune(steps=5,warmup=-2)", "warmup"),
])
def test_a_bad_last_step_fails_when_the_recipe_is_parsed(bad, says):
    """Every step checks its values at parse time: a recipe whose last step is wrong fails before its
    first (here a 10-step fine-tune) would run, naming the step and what is wrong."""
    with pytest.raises(RecipeError, match=says) as e:
        parse_recipe(f"finetune(steps=10) > {bad}")
    assert f"step {bad.split('(')[0]} " in str(e.value)


def test_a_stamp_written_before_a_step_gained_a_setting_still_resumes(tiny_ckpt, tmp_path):
    """Step directories are matched on checked arguments, not text: a done.json / started.json whose
    recipe lacks a setting the step has now (at its default) is the same step, while a different value,
    a different origin or an unparsable prefix is not."""
    import json

    from leandiff.recipe import _stamp_matches, apply_recipe, parse_recipe

    logs = []
    apply_recipe(tiny_ckpt, "cache(interval=2)", tmp_path / "o", progress=False, log=logs.append)
    done = tmp_path / "o" / ".steps" / "00-cache" / "done.json"
    stamp = json.loads(done.read_text())
    (full,) = stamp["recipe"]
    last = full[full.rindex(","):-1]  # the last setting, as an older leandiff without it would have written
    assert last.startswith(",") and "=" in last
    stamp["recipe"] = [full.replace(last, "")]
    done.write_text(json.dumps(stamp))
    logs.clear()
    apply_recipe(tiny_ckpt, "cache(interval=2)", tmp_path / "o", progress=False, log=logs.append)
    assert any("already done" in line for line in logs)

    steps, origin = parse_recipe("cache(interval=2)"), stamp["origin"]
    assert _stamp_matches({"recipe": [str(steps[0])], "origin": origin}, steps, origin)
    assert not _stamp_matches({"recipe": ["cache(interval=3)"], "origin": origin}, steps, origin)
    assert not _stamp_matches({"recipe": [str(steps[0])], "origin": "other"}, steps, origin)
    assert not _stamp_matches({"recipe": ["cache(nonsense=1)"], "origin": origin}, steps, origin)
    assert not _stamp_matches({"recipe": "cache(interval=2)", "origin": origin}, steps, origin)
