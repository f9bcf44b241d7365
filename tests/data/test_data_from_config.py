"""Config -> data and model (``data.from_config``, ``models.from_config``), and the sealed test split."""
import pytest

from twa_ray.config import config_from_dict
from twa_ray.data.from_config import splits_from_config, twa_datasets
from twa_ray.data.sealed import AUDIT_ENV, SealedSplitError
from twa_ray.models.from_config import model_from_config


def _cfg(**twa):
    return config_from_dict({
        "data": {"name": "synthetic", "val_ratio": 0.25,
                 "synthetic": {"num_train": 80, "num_test": 20, "num_classes": 3, "channels": 1, "image_size": 4}},
        "model": {"name": "mlp"}, "twa": twa,
    })


def test_test_split_is_sealed_unless_asked_and_each_read_is_audited(tmp_path, monkeypatch):
    audit = tmp_path / "audit.log"
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    splits = splits_from_config(_cfg())
    assert len(splits.test) == 20
    with pytest.raises(SealedSplitError):
        splits.test[0]
    assert not audit.exists()
    opened = splits_from_config(_cfg(), include_test=True, reason="final report")
    x, y = opened.test[0]
    assert x.shape == (1, 4, 4)
    assert audit.read_text().count("final report") == 1


def test_twa_datasets_never_hand_out_test():
    cfg = _cfg(data="train")
    splits = splits_from_config(cfg)
    train, select = twa_datasets(cfg, splits)
    assert train is splits.train and select is splits.val
    cfg = _cfg(data="val", select_ratio=0.25)
    train, select = twa_datasets(cfg, splits)
    assert len(train) + len(select) == len(splits.val) == 20
    assert not set(train.indices) & set(select.indices)
    assert model_from_config(cfg, splits)(splits.train[0][0][None]).shape == (1, 3)
