"""Ray Tune sweep over TWA settings on one shared candidate store
(``twa-ray tune``; see twa_ray/cli/tune.py).

    python jobs/tune_twa.py --config configs/tune_quickstart.yaml [a.b=value ...]
    ray job submit --working-dir . -- python jobs/tune_twa.py --config configs/tune_quickstart.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from twa_ray.cli.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
