"""The README's shell commands as a reader copies them: the job tests run them verbatim, with
only what a tiny test needs appended, so a README edit that breaks a command fails a test."""
import re

from conftest import ROOT

README = ROOT / "README.md"


def readme_blocks() -> list[list[str]]:
    """Each ```bash block of README.md as its commands: continued lines joined, comments and
    blank lines dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
        out.append([line for line in lines if line and not line.startswith("#")])
    return out


def readme_block_with(prefix: str) -> list[str]:
    """The one README bash block holding a command that starts with ``prefix``."""
    found = [block for block in readme_blocks() if any(c.startswith(prefix) for c in block)]
    assert len(found) == 1, f"expected one bash block of README.md with {prefix!r}, found {len(found)}"
    return found[0]


def quickstart_command() -> str:
    """The main job as the README's quickstart runs it: ``bash quickstart.sh`` installs what is
    missing (not here: tests run with the packages installed), then execs this line."""
    assert "bash quickstart.sh" in readme_block_with("bash quickstart.sh")
    script = (ROOT / "quickstart.sh").read_text().splitlines()
    (line,) = [line.strip() for line in script if line.strip().startswith("exec ")]
    return line
