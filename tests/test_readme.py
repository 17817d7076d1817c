"""The README's first screen must stay true: its Python example runs as written."""
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(example.strip().splitlines()) <= 5
    p = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_readme_names_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_commands_exist_and_recipes_parse():
    from leandiff.cli import main
    from leandiff.recipe import parse_recipe

    text = (ROOT / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("leandiff ")]
    assert len(lines) >= 10
    for ln in lines:
        assert ln.split()[1] in main.commands, ln
    try:
        import nncf, openvino  # noqa: F401  (the optional extra: its recipes are refused without it)
        extra = True
    except ImportError:
        extra = False
    for recipe in re.findall(r'--recipe "([^"]+)"', text):
        if extra or "openvino" not in recipe:
            parse_recipe(recipe)  # raises on a recipe that would not run
