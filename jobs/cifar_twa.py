"""The main job: base training -> candidate store -> sharded TWA -> evaluation -> run folder
(``twa-ray run``; see twa_ray/cli/run.py).

    python jobs/cifar_twa.py --config configs/quickstart.yaml [a.b=value ...]
    ray job submit --working-dir . -- python jobs/cifar_twa.py --config configs/quickstart.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from twa_ray.cli.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
