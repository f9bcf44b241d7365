"""benchmarks/job_summaries.py: the README's quickstart block from a results line (no job runs here:
the jobs themselves are tested in tests/jobs)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))

import job_summaries  # noqa: E402

LINE = {"benchmark": "job_summaries", "job": "quickstart", "command": "python jobs/cifar_twa.py --config x --force",
        "date": "2026-12-07 18:00 UTC", "job_wall_s": 83.26,
        "summary": {"config": "quickstart", "test_acc": {"twa": 84.1049, "ema": 83.36}, "cost_ratio": 0.65543,
                    "not_shown": 1, "time_s": {"twa": {"startup": 13.0774, "compute": 1.7}}},
        "machine": {"git_commit": "abc1234"}}


def test_the_readme_block_shows_the_lines_summary_rounded_with_its_date_and_commit(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{job_summaries.QUICKSTART_BEGIN}\nold\n{job_summaries.QUICKSTART_END}\nafter\n")
    job_summaries.write_readme(readme, [LINE])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert "2026-12-07 18:00 UTC, commit abc1234, 83 s in all" in text
    shown = json.loads(text[text.index("```json") + 7:text.rindex("```")])
    assert shown == {"config": "quickstart", "test_acc": {"twa": 84.105, "ema": 83.36},
                     "time_s": {"twa": {"startup": 13.077, "compute": 1.7}}, "cost_ratio": 0.655}


def test_a_readme_without_the_block_or_results_without_a_quickstart_are_refused(tmp_path):
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no block\n")
    with pytest.raises(SystemExit, match="PLAIN.md has no"):
        job_summaries.write_readme(plain, [LINE])
    with pytest.raises(SystemExit, match="no quickstart line"):
        job_summaries.write_readme(plain, [{**LINE, "job": "soup"}])
    assert plain.read_text() == "no block\n"
    with pytest.raises(SystemExit):
        job_summaries.main(["--jobs", "quickstart,nope"])
