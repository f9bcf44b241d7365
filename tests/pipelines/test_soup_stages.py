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


def test_a_store_of_other_checkpoints_is_refused_naming_what_differs(tmp_path):
    """The soup job's store check, before Ray starts (issue 23, defect 2)."""
    import pytest
    import torch

    from twa_ray.config import ConfigError, config_to_dict
    from twa_ray.pipelines.soups import _signature, check_imported, check_reuse
    from twa_ray.store import CandidateStore

    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(2):
        torch.save({"w": torch.full((2,), float(i))}, folder / f"model_{i}.pt")
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "checkpoints_dir": str(folder)})
    assert check_imported(cfg, folder) is None  # nothing imported yet
    store = CandidateStore.create(cfg.store_uri, ["w"], [(2,)],
                                  meta={"config": config_to_dict(cfg), "signature": _signature(folder)})
    for i in range(2):
        store.append({"w": torch.full((2,), float(i))})
    assert check_imported(cfg, folder).uri == store.uri  # the same files: reused
    torch.save({"w": torch.zeros(3)}, folder / "model_2.pt")  # the folder has changed since
    with pytest.raises(ConfigError, match=r"the candidate store .* \(for the checkpoints in .*models\) was made "
                                          r"with other settings \(checkpoint count, checkpoints differ\): run with "
                                          r"--force to start afresh, or choose another output_dir or store"):
        check_reuse(cfg, tmp_path / "run")


def test_a_changed_shard_of_a_sharded_checkpoint_changes_the_folders_signature(tmp_path):
    """The soup job reuses an imported store only for the same checkpoints: a sharded model's
    shard files count, not just its index (a rewritten shard used to go unnoticed)."""
    import json
    import os

    import torch
    from safetensors.torch import save_file

    from twa_ray.pipelines.soups import _signature

    model = tmp_path / "models" / "model_0"
    model.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"weight": torch.zeros(2, 2)},
              "model-00002-of-00002.safetensors": {"bias": torch.zeros(2)}}
    for name, tensors in shards.items():
        save_file(tensors, str(model / name))
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, tensors in shards.items() for k in tensors}}))
    before = _signature(tmp_path / "models")
    save_file({"bias": torch.ones(3)}, str(model / "model-00002-of-00002.safetensors"))
    os.utime(model / "model.safetensors.index.json", ns=(before[0][1][0][2],) * 2)  # the index as it was...
    assert _signature(tmp_path / "models") != before  # ...and the changed shard still shows


def test_fine_tuned_models_are_reused_wherever_their_data_was_read_from(tmp_path):
    """data.root is settled absolute in the working dir (another copy under `ray job submit`):
    the fine-tuned models are the same settings; another seed is not (issue 24)."""
    import pytest

    from twa_ray.config import ConfigError
    from twa_ray.output.atomic import write_json
    from twa_ray.pipelines.finetune import FINETUNED_DIR, SETTINGS_FILE, check_finetuned, finetune_settings

    def cfg(root, seed=0):
        return config_from_dict({"seed": seed, "data": {"root": root}, "finetune": {"num_models": 2}})

    run = tmp_path / "run"
    (run / FINETUNED_DIR).mkdir(parents=True)
    write_json(run / FINETUNED_DIR / SETTINGS_FILE, finetune_settings(cfg(str(tmp_path / "copy1" / "data"))))
    assert check_finetuned(cfg(str(tmp_path / "copy2" / "data")), run)
    with pytest.raises(ConfigError, match=r"fine-tuned models .* \(seed differ\)"):
        check_finetuned(cfg(str(tmp_path / "copy2" / "data"), seed=1), run)


def test_the_soups_and_the_summary_follow_the_methods_registry(tmp_path, monkeypatch):
    """The soup job selects each registered soup on val (``output.methods``) and lists the
    soup job's methods in summary.json; a soup registered in a test joins them, no other edit."""
    from types import SimpleNamespace

    import torch

    from twa_ray.core.params import flatten_params
    from twa_ray.core.soups import Soup
    from twa_ray.data.from_config import splits_from_config
    from twa_ray.models.from_config import model_from_config
    from twa_ray.output import methods
    from twa_ray.pipelines import soups
    from twa_ray.store import CandidateStore

    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"), "checkpoints_dir": str(tmp_path / "models"), "seed": 0,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 16, "eval_batch_size": 32,
                 "synthetic": {"num_train": 64, "num_test": 16, "num_classes": 3, "channels": 1, "image_size": 8}},
        "model": {"name": "small_cnn", "kwargs": {"widths": [4, 4, 4]}}, "twa": {"bn_batches": 1},
    })
    net = model_from_config(cfg, splits_from_config(cfg))
    store = CandidateStore.create_for_model(cfg.store_uri, net)
    gen = torch.Generator().manual_seed(0)
    w0 = flatten_params(net)
    for i in range(3):
        store.append_flat(w0 + 0.2 * torch.randn(w0.shape, generator=gen), {"kind": "imported", "entry": f"m{i}.pt"})

    def worst_individual(candidates, score, scores):
        row = min(range(len(scores)), key=scores.__getitem__)
        return Soup(candidates[row].clone(), [row], scores[row])

    selection = soups.select_soups(cfg, store.uri)
    assert list(selection.soups) == ["best_individual", "uniform_soup", "greedy_soup"]
    assert selection.soups["best_individual"].score == max(selection.val_values)
    monkeypatch.setitem(methods.METHODS, "worst_individual", methods.Method(
        "worst_individual", "worst individual", jobs=(methods.SOUP,), soup=worst_individual))
    selection = soups.select_soups(cfg, store.uri)
    assert list(selection.soups) == ["best_individual", "uniform_soup", "greedy_soup", "worst_individual"]
    assert selection.soups["worst_individual"].score == min(selection.val_values)
    assert soups.soup_methods() == ["best_individual", "uniform_soup", "greedy_soup", "twa", "worst_individual"]
    results = {m: SimpleNamespace(value=50.0 + i, loss=1.0) for i, m in enumerate(soups.soup_methods())}
    results.update({f"cand:{c}": SimpleNamespace(value=40.0, loss=1.0) for c in selection.indices})
    twa = SimpleNamespace(projection_bytes=[8])
    summary = soups.soup_summary(cfg, None, selection, twa, results, store.uri, {})
    assert list(summary["test_acc"]) == soups.soup_methods()
    assert list(summary["val_acc"]) == ["best_individual", "uniform_soup", "greedy_soup", "worst_individual"]
    assert summary["best_individual"] == selection.soups["best_individual"].members[0]
