"""The test split sealed away from every stage that trains or selects.

Training and selection stages get a ``SealedSplit`` in place of the test split: any read
raises. Only the final evaluation unseals it (``data.from_config.splits_from_config(...,
include_test=True)``), and each unsealing is logged and, when the environment variable
``TWA_RAY_TEST_AUDIT`` names a file, appended to it (one line per read), so a sweep can
prove that its trials never read the test split.
"""
from __future__ import annotations

import logging
import os
import time

from torch.utils.data import Dataset

log = logging.getLogger(__name__)

AUDIT_ENV = "TWA_RAY_TEST_AUDIT"


class SealedSplitError(RuntimeError):
    """A stage that must not see the test split tried to read it."""


class SealedSplit(Dataset):
    """Stands in for the test split: its length is known, its items are not."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        raise SealedSplitError(
            "the test split is sealed here: only the final evaluation reads it (never training or selection)"
        )


def record_test_read(reason: str) -> None:
    """Log (and audit, see module doc) that the test split is being unsealed."""
    log.info("test split unsealed: %s", reason)
    path = os.environ.get(AUDIT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} pid={os.getpid()} {reason}\n")
