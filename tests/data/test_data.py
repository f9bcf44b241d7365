"""twa_ray.data: registry, splits, loaders (fake CIFAR, real Fashion-MNIST when installed)."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from twa_ray.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetNotFoundError,
    available_datasets,
    build_splits,
    make_fake_cifar,
    read_idx,
    split_indices,
)
from twa_ray.data import fashion_mnist as fmnist_module

SYNTH = {"num_train": 100, "num_test": 30, "num_classes": 5, "channels": 3, "image_size": 8}


def _synthetic(**kwargs):
    kwargs.setdefault("val_ratio", 0.2)
    kwargs.setdefault("seed", 0)
    return build_splits("synthetic", None, synthetic=SYNTH, **kwargs)


def test_registry_names_and_unknown_name():
    assert available_datasets() == ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic"]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10.*fashion_mnist.*synthetic"):
        build_splits("mnist", None, val_ratio=0.1, seed=0)


def test_splits_disjoint_cover_and_deterministic():
    s = _synthetic()
    train, val = set(s.train.indices), set(s.val.indices)
    assert len(train) == 80 and len(val) == 20
    assert not train & val and train | val == set(range(100))
    assert s.train_eval.indices == s.train.indices
    assert len(s.test) == 30
    assert (s.num_classes, s.in_channels, s.image_size) == (5, 3, 8)

    again = _synthetic()
    assert again.val.indices == s.val.indices and again.train.indices == s.train.indices
    assert torch.equal(again.train[3][0], s.train[3][0])  # data is deterministic too
    other = _synthetic(seed=1)
    assert other.val.indices != s.val.indices


def test_split_indices_sizes_and_types():
    train, val = split_indices(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    assert torch.all(train[1:] > train[:-1])  # sorted


def test_val_ratio_zero_gives_empty_val():
    s = _synthetic(val_ratio=0.0)
    assert len(s.val) == 0 and len(s.train) == 100


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, 0.999, 0.001])
def test_val_ratio_errors_name_the_field(ratio):
    with pytest.raises(ValueError, match=rf"data\.val_ratio.*{ratio}"):
        _synthetic(val_ratio=ratio)


def test_limits():
    s = _synthetic(limit_train=10, limit_val=3, limit_test=7)
    assert (len(s.train), len(s.val), len(s.test), len(s.train_eval)) == (10, 3, 7, 10)
    full = _synthetic()
    assert s.train.indices == full.train.indices[:10]
    with pytest.raises(ValueError, match="data.limit_train"):
        _synthetic(limit_train=0)


def test_synthetic_unknown_option_and_image_size_scope():
    with pytest.raises(ValueError, match="data.synthetic.*'bogus'"):
        build_splits("synthetic", None, val_ratio=0.1, seed=0, synthetic={"bogus": 1})
    with pytest.raises(ValueError, match="data.image_size"):
        build_splits("synthetic", None, val_ratio=0.1, seed=0, image_size=64)


def test_splits_batch_and_pickle():
    s = _synthetic()
    x, y = next(iter(DataLoader(s.train, batch_size=16)))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    restored = pickle.loads(pickle.dumps(s))  # datasets travel to Ray workers
    assert torch.equal(restored.val[0][0], s.val[0][0])


@pytest.mark.parametrize("num_classes", [10, 100])
def test_fake_cifar_path(tmp_path, num_classes):
    name = f"cifar{num_classes}"
    folder = make_fake_cifar(tmp_path, num_classes=num_classes, n_train=60, n_test=12)
    expected = {10: "cifar-10-batches-py", 100: "cifar-100-python"}[num_classes]
    assert folder == tmp_path / expected

    s = build_splits(name, tmp_path, val_ratio=0.25, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (45, 15, 12)
    assert (s.num_classes, s.in_channels, s.image_size) == (num_classes, 3, 32)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < num_classes

    # The eval views are the stored pixels, normalised: compare with the raw pickle.
    raw_name = "data_batch_1" if num_classes == 10 else "train"
    with open(folder / raw_name, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    i = s.train_eval.indices[0]
    assert i < len(raw["data"])
    pixels = torch.from_numpy(raw["data"][i].reshape(3, 32, 32)).float() / 255
    if num_classes == 10:
        mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
        torch.testing.assert_close(s.train_eval[0][0], (pixels - mean) / std)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    assert s.train_eval[0][1] == raw[label_key][i]

    plain = build_splits(name, tmp_path, val_ratio=0.25, seed=0, augment=False)
    torch.testing.assert_close(plain.train[0][0], plain.train_eval[0][0])


def test_missing_cifar_error_names_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py") as info:
        build_splits("cifar10", tmp_path, val_ratio=0.1, seed=0)
    assert str(tmp_path) in str(info.value) and "data.download=true" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        build_splits("cifar100", tmp_path, val_ratio=0.1, seed=0)


def test_missing_fashion_mnist_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(DatasetNotFoundError) as info:
        build_splits("fashion_mnist", tmp_path / "nowhere", val_ratio=0.1, seed=0)
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "system") in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_from_root_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIR", tmp_path / "system")
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (50, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(50) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (20, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(20) % 10,
    }
    for stem, array in arrays.items():
        _write_idx(tmp_path / f"{stem}.gz", array)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte"])
    s = build_splits("fashion_mnist", tmp_path, val_ratio=0.2, seed=0, augment=False)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert s.test[3][1] == 3 and s.test[0][0].shape == (1, 28, 28)


def test_fashion_mnist_real(fashion_mnist):
    assert fmnist_module.SYSTEM_DIR == fashion_mnist
    s = build_splits("fashion_mnist", None, val_ratio=0.0, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (60000, 0, 10000)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 28)
    x, y = s.test[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    labels = torch.tensor([s.test[i][1] for i in range(len(s.test))])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    split = build_splits("fashion_mnist", None, val_ratio=0.1, seed=0)
    assert (len(split.train), len(split.val)) == (54000, 6000)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    s = build_splits("imagefolder", tmp_path, val_ratio=0.2, seed=0, image_size=32)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 4)
    assert (s.num_classes, s.in_channels, s.image_size) == (2, 3, 32)
    assert s.train[0][0].shape == (3, 32, 32) and s.test[0][0].shape == (3, 32, 32)

    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "missing" / "train")):
        build_splits("imagefolder", tmp_path / "missing", val_ratio=0.1, seed=0)


def test_missing_fashion_mnist_skips_but_fails_under_ci(tmp_path, monkeypatch):
    """A test needing the offline data skips without it, with the reason; under CI=true it
    fails instead (setup_env.sh could not install it), never a silent skip."""
    from conftest import require_fashion_mnist

    missing = tmp_path / "fashion-mnist"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="setup_env.sh could not install it"):
        require_fashion_mnist(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: needs Fashion-MNIST in .*fashion-mnist"):
        require_fashion_mnist(missing)
    assert require_fashion_mnist(tmp_path) == tmp_path
