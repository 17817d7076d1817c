"""The package's layers: every module imports alone (no import order matters, no registry is filled as a
side effect of some other import), and the import-layer contract of pyproject.toml holds."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "leandiff").rglob("*.py") if "zoo" not in p.parts)

# One interpreter (torch and diffusers stay loaded: cheap), every leandiff module dropped from sys.modules
# before the next is imported on its own; then the registries are full whichever module came first.
_SCRIPT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "leandiff" or m.startswith("leandiff.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    assert "leandiff.surgery.quant" in MODULES and "leandiff.compress.calibration" in MODULES
    p = subprocess.run([sys.executable, "-c", _SCRIPT, *MODULES], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]


def test_registries_are_full_from_any_entry_point():
    """A surgery record, a step and a runtime resolve after importing only the module that reads them."""
    code = ("import leandiff.models as m; assert {'prune', 'quant', 'lowrank', 'lora'} <= set(m.SURGERY); "
            "import leandiff.runtime as r; assert 'cache' in r.RUNTIMES and 'ort-int8' in r.RUNTIMES; "
            "import leandiff.recipe as rc; assert {'prune', 'quant', 'kd', 'cache'} <= set(rc.STEPS)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_import_layer_contract_holds():
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    p = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
