"""Fashion-MNIST (60000 train / 10000 test, 1 x 28 x 28, 10 classes) read from idx files.

Looks, in order, in ``root``, ``root/FashionMNIST/raw`` (where torchvision downloads to)
and ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
Files may be gzipped (``*-ubyte.gz``) or not.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetNotFoundError
from .in_memory import InMemoryImageDataset
from .source import SourceData
from .transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, tensor_transforms

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped) into an array of the shape in its header.

    Header: 2 zero bytes, a dtype byte, a byte with the number of dims, then one big-endian
    uint32 per dim.
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=4 + 4 * ndim)
    return data.reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | Path | None) -> dict[str, Path] | None:
    """Paths of the four idx files in the first folder that holds all of them, else None."""
    folders = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root is not None else []
    for folder in folders + [SYSTEM_DIR]:
        paths = {key: _find_file(folder, stem) for key, stem in FILES.items()}
        if all(paths.values()):
            return paths
    return None


def _download(root: str | Path) -> None:
    from torchvision.datasets import FashionMNIST  # checks md5 of what it downloads

    FashionMNIST(str(root), train=True, download=True)


def load_fashion_mnist(root: str | Path | None, *, download: bool = False, augment: bool = True) -> SourceData:
    """Load Fashion-MNIST into memory: images (N, 1, 28, 28) uint8, labels (N,) int64.

    With ``augment`` training images are padded by 2, randomly cropped to 28 and flipped.
    """
    paths = find_fashion_mnist(root)
    if paths is None and download:
        if root is None:
            raise ValueError("data.root must name a folder to download Fashion-MNIST into")
        _download(root)
        paths = find_fashion_mnist(root)
    if paths is None:
        looked = [str(root), str(Path(root) / "FashionMNIST" / "raw")] if root is not None else []
        raise DatasetNotFoundError(
            "Fashion-MNIST not found. Looked for "
            f"{', '.join(s + '[.gz]' for s in FILES.values())} in: {', '.join(looked + [str(SYSTEM_DIR)])}. "
            "Get it with `apt-get install -y dataset-fashion-mnist` (installs to "
            f"{SYSTEM_DIR}), or set data.download=true (needs internet) to download into data.root."
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    train_x = torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1)  # (60000, 1, 28, 28)
    test_x = torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1)  # (10000, 1, 28, 28)
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    train_t, eval_t = tensor_transforms(FASHION_MNIST_MEAN, FASHION_MNIST_STD, 28, crop_padding=2, augment=augment)
    return SourceData(
        make_train=lambda transform: InMemoryImageDataset(train_x, train_y, transform),
        make_test=lambda transform: InMemoryImageDataset(test_x, test_y, transform),
        num_train=len(train_y), num_test=len(test_y), num_classes=10, in_channels=1, image_size=28,
        train_transform=train_t, eval_transform=eval_t,
    )
