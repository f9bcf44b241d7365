"""``python -m twa_ray ...``: the same command line as ``twa-ray`` (``twa_ray.cli``)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
