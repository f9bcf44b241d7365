"""The soup job's stages that need no Ray: its config checks and the fine-tuning settings."""
from twa_ray.config import config_from_dict
from twa_ray.pipelines.finetune import finetune_specs
from twa_ray.pipelines.soups import soup_config_problems


def test_finetune_settings_are_varied_and_checked():
    cfg = config_from_dict({"seed": 3, "finetune": {"num_models": 10, "lrs": [0.01, 0.1], "weight_decays": [0.0, 1e-4],
                                                    "augment": [True, False], "label_smoothing": [0.0]}})
    specs = finetune_specs(cfg)
    assert [s.index for s in specs] == list(range(10)) and len({s.seed for s in specs}) == 10
    grid = {(s.lr, s.weight_decay, s.augment, s.label_smoothing) for s in specs}
    assert len(grid) == 8  # every combination before any repeats
    assert specs == finetune_specs(cfg)  # deterministic
    bad = config_from_dict({"finetune": {"num_models": 1, "lrs": [], "label_smoothing": [1.5]}})
    problems = "\n".join(soup_config_problems(bad))
    assert "finetune.num_models" in problems and "finetune.lrs" in problems and "finetune.label_smoothing" in problems
    assert soup_config_problems(config_from_dict({"checkpoints_dir": "x"})) == []
