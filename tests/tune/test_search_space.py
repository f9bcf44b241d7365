"""tune.space: bounds in every float notation, as float fields take them (issue 23, defect 11)."""
import pytest
import yaml

from twa_ray.config import ConfigError, config_from_dict
from twa_ray.tune.search_space import _check_entry, validate_space


def test_loguniform_bounds_take_every_float_notation_from_yaml():
    space = yaml.safe_load("twa.lr: {loguniform: [1e-4, 5E-1]}\ntwa.weight_decay: {uniform: [.5, 1_000]}\n")
    assert space["twa.lr"]["loguniform"] == ["1e-4", "5E-1"]  # YAML 1.1 reads these as strings
    assert _check_entry("twa.lr", space["twa.lr"]) == ("loguniform", [1e-4, 0.5])
    assert _check_entry("twa.weight_decay", space["twa.weight_decay"]) == ("uniform", [0.5, 1000.0])
    validate_space(config_from_dict({"name": "s", "tune": {"space": space}}))


@pytest.mark.parametrize("bounds", [["1e-4x", 1.0], [True, 2.0], [1.0, 0.5], [0, 1.0], [1.0]])
def test_bad_bounds_are_refused_naming_the_key(bounds):
    with pytest.raises(ConfigError, match=r"tune.space.twa.lr.loguniform: expected \[low, high\]"):
        _check_entry("twa.lr", {"loguniform": bounds})
