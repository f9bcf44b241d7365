"""The soup job: fine-tuned models -> TWA-v vs. best individual, uniform and greedy soup
(``twa-ray soup``; see twa_ray/cli/soup.py).

    python jobs/soup_twa.py --config configs/soup_quickstart.yaml [a.b=value ...]
    ray job submit --working-dir . -- python jobs/soup_twa.py --config configs/soup_quickstart.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from twa_ray.cli.soup import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
