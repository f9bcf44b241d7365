"""twa.candidates that selects fewer than two candidates is refused before base training:
the candidate count follows from the config (``pipelines.main.check_candidate_count``)."""
import pytest

from twa_ray.cli import run as run_cli
from twa_ray.config import ConfigError, TrainConfig, config_from_dict
from twa_ray.pipelines.main import check_candidate_count
from twa_ray.runtime.base_loop import candidate_steps, epoch_steps


def test_candidate_steps_follow_base_trainings_saving_rule():
    # the quickstart: 4 epochs of 64 steps, every 16 steps, no initial weights -> 4 per epoch
    quick = TrainConfig(epochs=4, save_initial=False, save_every_steps=16)
    assert candidate_steps(quick, 64) == list(range(16, 257, 16))
    assert candidate_steps(TrainConfig(epochs=2), 5) == [0, 5, 10]  # initial + one per epoch
    # every 4 steps of 10-step epochs: the epoch ends are saved once, not twice
    assert candidate_steps(TrainConfig(epochs=2, save_every_steps=4, save_initial=False), 10) == [4, 8, 10, 12, 16, 20]
    # the tail stage: from epoch 2 on (step 20), the initial weights never
    assert candidate_steps(TrainConfig(epochs=3, save_every_steps=5, save_from_epoch=2), 10) == [20, 25, 30]
    assert candidate_steps(TrainConfig(epochs=0), 10) == [0]


def test_epoch_steps_drop_a_last_batch_too_small_for_every_rank():
    assert epoch_steps(160, 32, 1) == 5
    assert epoch_steps(161, 32, 1) == 5  # a last batch of 1 gives a rank fewer than 2 examples: dropped
    assert epoch_steps(162, 32, 1) == 6
    assert epoch_steps(163, 32, 2) == 5 and epoch_steps(164, 32, 2) == 6


def _cfg(**twa):
    return config_from_dict({"train": {"epochs": 4, "save_initial": False, "save_every_steps": 16},
                             "data": {"batch_size": 128}, "twa": twa})


def test_fewer_than_two_is_refused_naming_twa_candidates_and_the_count():
    assert check_candidate_count(_cfg(candidates="last:8"), 8192) == list(range(8, 16))  # 64 steps an epoch
    with pytest.raises(ValueError) as err:
        check_candidate_count(_cfg(candidates="last:1"), 8192)
    assert "twa.candidates='last:1' selects 1 of the 16 base training will save" in str(err.value)
    assert "train.save_every_steps=16" in str(err.value)
    # one epoch of 40 steps, saved every 16 steps and at its end: 16, 32, 40; every 4th keeps one
    one_epoch = _cfg(candidates="stride:4")
    one_epoch.train.epochs = 1
    with pytest.raises(ValueError, match="selects 1 of the 3"):
        check_candidate_count(one_epoch, 128 * 40)
    cfg = config_from_dict({"train": {"epochs": 1, "save_initial": False}, "twa": {"candidates": "all"}})
    with pytest.raises(ValueError, match="selects 1 of the 1"):
        check_candidate_count(cfg, 1000)


def test_twa_start_out_of_range_of_the_coming_candidates_is_refused():
    cfg = config_from_dict({"train": {"epochs": 3, "save_initial": False},
                            "twa": {"basis": "checkpoints", "start": 2}})
    assert check_candidate_count(cfg, 1000) == [0, 1, 2]
    cfg.train.epochs = 2
    with pytest.raises(ConfigError, match="twa.start"):
        check_candidate_count(cfg, 1000)


def test_the_job_refuses_before_base_training(tmp_path, monkeypatch, capsys):
    """The main job's driver checks after loading the data, before Ray or any training starts."""
    def no_training(*args, **kwargs):
        raise AssertionError("Ray and base training must not start")

    monkeypatch.setattr(run_cli, "run", no_training)
    monkeypatch.setattr(run_cli, "setup_logging", lambda *args, **kwargs: None)  # no handler on captured stderr
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        "data: {name: synthetic, val_ratio: 0.2, batch_size: 32, synthetic: {num_train: 200, num_test: 50}}\n"
        "train: {epochs: 2, save_initial: false}\n"
        "twa: {candidates: 'first:1'}\n")
    assert run_cli.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "error: TWA needs at least two candidates" in err and "twa.candidates='first:1' selects 1 of the 2" in err
