"""Importing twa_ray.integrations needs neither Lightning nor transformers."""
import subprocess
import sys

from conftest import ROOT


def test_importing_twa_ray_integrations_imports_no_framework():
    code = ("import sys, twa_ray, twa_ray.integrations, twa_ray.integrations._common; "
            "print(sorted(m for m in ('lightning', 'transformers', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
