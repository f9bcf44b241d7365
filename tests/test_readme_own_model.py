"""README "Your own model": its Python blocks run as written, in order, in one fresh folder
(the plain-loop core, the Lightning callback, the Hugging Face callback, checkpoints averaged
after training), each as a reader would paste it into a file and run it."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, require_module


def own_model_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_four_programs():
    blocks = own_model_blocks()
    assert len(blocks) == 4
    assert "twa_ray.core" in blocks[0] and "integrations.lightning" in blocks[1]
    assert "integrations.transformers" in blocks[2] and "import_checkpoints" in blocks[3]


def test_the_readme_programs_run_as_written_in_order(tmp_path):
    require_module("lightning")
    require_module("transformers")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    expected = [r"TWA coefficients \(4, \d+\)", r"TWA coefficients \(4, \d+\)",
                r"eval loss of the averaged model \d", r"averaged 3 checkpoints"]
    for i, (block, says) in enumerate(zip(own_model_blocks(), expected)):
        script = tmp_path / f"block_{i}.py"
        script.write_text(block)
        done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"block {i}:\n{block}\n{done.stderr[-3000:]}"
        assert re.search(says, done.stdout), (i, done.stdout[-2000:])
