"""The house's one-way imports."""

import shutil
import subprocess
import sys

import pytest


def test_import_gesim_loads_neither_torch_nor_matplotlib():
    code = ("import sys, gesim, gesim.losses, gesim.symbolic, gesim.dynamics; "
            "gesim.dynamics.evaluate('dpo', lw=-1, ll=-2, ip=0, nw2=1, nl2=1); "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_layers_contract_is_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter not installed")
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
