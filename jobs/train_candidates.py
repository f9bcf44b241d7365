"""Base training only: train a model on Ray Train and fill the candidate store
(``twa-ray train-candidates``; see twa_ray/cli/train_candidates.py).

    python jobs/train_candidates.py --config configs/quickstart.yaml [a.b=value ...]
    ray job submit --working-dir . -- python jobs/train_candidates.py --config configs/quickstart.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from twa_ray.cli.train_candidates import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
