"""Base training on Ray Train: candidates in the store, schedule budget, resume, restarts, the job."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from twa_ray.config import config_from_dict
from twa_ray.core.params import ParamLayout
from twa_ray.core.schedules import ScheduleSpec, compressed_factor, lr_factor
from twa_ray.parallel.checkpoint_files import load_checkpoint, load_checkpoint_info, save_checkpoint
from twa_ray.runtime.base_loop import _drop_last
from twa_ray.runtime.base_train import BaseTrainResult, checkpoint_info, read_final
from twa_ray.store import CandidateStore

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4  # 160 synthetic images, 20% val -> 128 train, batches of 32


def tiny_raw(out: Path, **train) -> dict:
    """A config dict: 8x8 synthetic images, an MLP (no BatchNorm: k workers == 1 worker exactly)."""
    return {
        "name": "tiny", "output_dir": str(out), "seed": 0,
        "data": {"name": "synthetic", "batch_size": 32, "val_ratio": 0.2,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 4, "channels": 1, "image_size": 8}},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "train": {"epochs": 2, "budget_epochs": 4, "schedule": "linear", "lr": 0.1, "workers": 2, **train},
    }


def steps(store: CandidateStore) -> list[int]:
    return [c.info["step"] for c in store.list_candidates()]


def final(result, store: CandidateStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weights, EMA) of a run's last checkpoint, in the store's parameter order."""
    return read_final(result.checkpoint_path, ParamLayout(tuple(store.names), tuple(map(tuple, store.shapes))))


# --------------------------------------------------------------------- no Ray


def test_checkpoint_folder_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3},
                    {"epoch": 3, "history": [{"epoch": 3, "lr": 0.1}]})
    state = load_checkpoint(tmp_path)  # weights_only=True
    assert torch.equal(state["model"]["weight"], net.weight.detach())
    assert state["epoch"] == 3 and "momentum_buffer" in state["optimizer"]["state"][0]
    assert load_checkpoint_info(tmp_path)["history"] == [{"epoch": 3, "lr": 0.1}]


def test_last_batch_too_small_for_every_rank_is_dropped():
    assert not _drop_last(128, 32, 2)  # no remainder
    assert _drop_last(129, 32, 1)  # a batch of 1 (BatchNorm cannot train on it)
    assert _drop_last(131, 32, 2) and not _drop_last(132, 32, 2)  # 2 ranks need >= 2 each


# --------------------------------------------------------------------- the job (own Ray, first)


def test_job_script_runs_end_to_end(tmp_path):
    config = tmp_path / "tiny_job.yaml"
    config.write_text("# run: python jobs/train_candidates.py --config tiny_job.yaml\n"
                      + yaml.safe_dump(tiny_raw(tmp_path / "out", workers=1)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_candidates.py"), "--config", str(config), "train.epochs=1"],
        cwd=tmp_path,  # not the checkout: workers must still import twa_ray
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store_path = tmp_path / "out" / "candidates"
    assert f"candidate store: {store_path}" in proc.stdout
    assert len(CandidateStore.open(store_path)) == 2  # initial + 1 epoch


def test_job_script_names_config_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochz: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_candidates.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "train.epochz" in proc.stderr


# --------------------------------------------------------------------- on the fixture's Ray


@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory):
    """2 workers, 2 epochs of a 4-epoch linear schedule."""
    from twa_ray.runtime.base_train import run_base_training

    cfg = config_from_dict(tiny_raw(tmp_path_factory.mktemp("two") / "run"))
    return cfg, run_base_training(cfg)


def test_two_workers_fill_the_store(two_workers):
    cfg, result = two_workers
    store = CandidateStore.open(result.store_uri)
    assert result.num_candidates == len(store) == 3  # initial + 2 epochs
    infos = [c.info for c in store.list_candidates()]
    assert [(i["kind"], i["epoch"], i["step"]) for i in infos] == [
        ("initial", 0, 0), ("epoch", 1, STEPS_PER_EPOCH), ("epoch", 2, 2 * STEPS_PER_EPOCH)]
    assert infos[2]["metrics"]["train_acc"] == result.metrics[-1]["train_acc"]
    assert store.names == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]  # no DDP "module." prefix
    meta = store.meta
    assert meta["stage"] == "base_train" and meta["task"] == "image_classification"
    spec = meta["model_spec"]  # what builds the model (tasks.model_spec)
    assert spec["name"] == "mlp" and (spec["num_classes"], spec["in_channels"], spec["image_size"]) == (4, 1, 8)
    w = store.read()
    assert all(not torch.equal(w[i], w[i + 1]) for i in range(2))
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "time"} <= set(result.metrics[-1])
    assert [m["train_examples"] for m in result.metrics] == [128, 128]  # both workers' examples, counted once
    assert result.run_path == os.path.join(cfg.run_dir, "ray", "tiny-base")


def test_schedule_is_laid_out_for_the_budget(two_workers):
    _, result = two_workers
    total = 4 * STEPS_PER_EPOCH  # budget_epochs=4, only 2 run
    last_lr = result.metrics[-1]["lr"]  # the lr of the last step taken
    assert last_lr == pytest.approx(0.1 * lr_factor(2 * STEPS_PER_EPOCH - 1, ScheduleSpec("linear", total)))
    assert 0.45 < last_lr / 0.1 < 0.6  # about half-way down the linear schedule


def test_resume_runs_only_the_new_epoch_and_matches_two_workers(ray_local, two_workers, tmp_path):
    """One worker, epochs=2, then epochs=3 with the same run: only epoch 3 runs.

    With an MLP the one-worker run also equals the two-worker run: same global batches,
    the loss scaled so that DDP's mean is the global batch's mean gradient.
    """
    from twa_ray.runtime.base_train import run_base_training

    first = run_base_training(config_from_dict(tiny_raw(tmp_path / "run", workers=1)))
    second = run_base_training(config_from_dict(tiny_raw(tmp_path / "run", workers=1, epochs=3)))
    store = CandidateStore.open(second.store_uri)
    assert second.num_candidates == 4 and steps(store) == [0, 4, 8, 12]
    assert [m["epoch"] for m in second.metrics] == [1, 2, 3]
    assert second.metrics[:2] == first.metrics  # epochs 1-2 came from the checkpoint, not a re-run
    assert store.list_candidates()[3].info["epoch"] == 3

    two = CandidateStore.open(two_workers[1].store_uri)
    torch.testing.assert_close(store.read(candidates=[0, 1, 2]), two.read(), atol=1e-5, rtol=1e-4)


def test_restarted_worker_group_resumes_without_duplicates(ray_local, two_workers, tmp_path):
    """The last rank fails once at the start of epoch 2; the restarted group resumes there."""
    from twa_ray.runtime.base_train import run_base_training

    raw = tiny_raw(tmp_path / "run")
    raw["data"]["download"] = True  # also exercises "one download per node, then a barrier"
    cfg = config_from_dict({**raw, "debug": {"fail_at_epoch": 2}})
    result = run_base_training(cfg)
    store = CandidateStore.open(result.store_uri)
    assert steps(store) == [0, 4, 8]
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert (Path(result.run_path) / "base-failed-at-epoch-2").exists()
    # resumed from the epoch-1 checkpoint (model, optimizer, schedule, data order): same weights
    torch.testing.assert_close(store.read(), CandidateStore.open(two_workers[1].store_uri).read(),
                               atol=1e-5, rtol=1e-4)
    # ... and the same EMA of the weights: it is part of the checkpoint, its decay follows the step
    weights, ema = final(result, store)
    _, uninterrupted = final(two_workers[1], store)
    assert (ema - uninterrupted).abs().max() <= 1e-6
    assert not torch.allclose(ema, weights, atol=1e-4)  # an average of the steps, not the last weights


def test_full_budget_continues_base_training_exactly(ray_local, two_workers, tmp_path):
    """Base training's 2 epochs continued to the 4-epoch budget equal 4 epochs in one go."""
    from twa_ray.runtime.base_train import run_base_training, run_full_budget_training

    cfg, base = two_workers
    full = run_full_budget_training(cfg, base)
    assert full.store_uri is None and [m["epoch"] for m in full.metrics] == [3, 4]  # only the remaining epochs ran
    assert len(CandidateStore.open(base.store_uri)) == 3  # it keeps no candidates
    assert checkpoint_info(full.checkpoint_path)["history"][:2] == base.metrics  # epochs 1-2 were not run again
    straight = run_base_training(config_from_dict(tiny_raw(tmp_path / "straight", epochs=4)))
    store = CandidateStore.open(base.store_uri)
    continued, _ = final(full, store)
    in_one_go, _ = final(straight, store)
    assert (continued - in_one_go).abs().max() <= 1e-6
    assert [m["train_loss"] for m in full.metrics] == pytest.approx([m["train_loss"] for m in straight.metrics[2:]],
                                                                    abs=1e-6)


def test_sgd_same_compute_continues_base_training_for_twas_epochs_with_the_schedule_compressed(two_workers):
    """Base training's 2 epochs of a 4-epoch linear schedule continued for 3 epochs (TWA's,
    more than the budget's 2 left): epochs 3-5 run, from the checkpoint, with the rest of the
    schedule annealed to its end over their 12 steps."""
    from twa_ray.runtime.base_train import run_sgd_same_compute_training

    cfg, base = two_workers
    same = run_sgd_same_compute_training(cfg, base, 3)
    assert same.store_uri is None and [m["epoch"] for m in same.metrics] == [3, 4, 5]  # TWA's 3 epochs, no more
    assert len(CandidateStore.open(base.store_uri)) == 3  # it keeps no candidates
    info = checkpoint_info(same.checkpoint_path)
    assert info["history"][:2] == base.metrics  # epochs 1-2 were not run again
    assert info["step"] == 5 * STEPS_PER_EPOCH and same.run_name == "tiny-sgd-same-compute-3"
    spec, start, steps = ScheduleSpec("linear", 4 * STEPS_PER_EPOCH), 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH
    # each epoch's lr is its last step's: continuation steps 3, 7 and 11
    expected = [0.1 * compressed_factor(j, spec, start, steps) for j in (3, 7, 11)]
    assert [m["lr"] for m in same.metrics] == pytest.approx(expected, abs=1e-9)
    # the budget's 8 steps left spread over 12: slower down, to the same end
    assert expected[0] > 0.1 * lr_factor(start + 3, spec) and expected[-1] == 0.0
    assert run_sgd_same_compute_training(cfg, BaseTrainResult(None, 0), 3) is None  # nothing to continue from


def test_sgd_same_compute_over_the_budgets_epochs_left_is_the_full_budget(ray_local, tmp_path):
    """A step schedule continued for exactly the epochs its budget has left decays at the same
    steps: the continuation equals training the whole budget in one go (the checkpoint's
    weights, momentum and step are where it starts; base training's epochs are not repeated)."""
    from twa_ray.runtime.base_train import run_base_training, run_sgd_same_compute_training

    raw = tiny_raw(tmp_path / "step", schedule="step", workers=1)
    base = run_base_training(config_from_dict(raw))
    same = run_sgd_same_compute_training(config_from_dict(raw), base, 2)
    assert [m["epoch"] for m in same.metrics] == [3, 4]
    straight = run_base_training(config_from_dict(tiny_raw(tmp_path / "straight", schedule="step", workers=1,
                                                           epochs=4)))
    store = CandidateStore.open(base.store_uri)
    continued, _ = final(same, store)
    in_one_go, _ = final(straight, store)
    assert (continued - in_one_go).abs().max() <= 1e-6
    assert [m["train_loss"] for m in same.metrics] == pytest.approx([m["train_loss"] for m in straight.metrics[2:]],
                                                                    abs=1e-6)
    assert [m["lr"] for m in same.metrics] == pytest.approx([m["lr"] for m in straight.metrics[2:]])


def test_a_reused_store_finds_base_trainings_last_checkpoint(two_workers):
    """The main job's reuse path: no training, and the EMA (and the full budget's start) still there."""
    from twa_ray.pipelines.main import ensure_candidates

    cfg, base = two_workers
    reused = ensure_candidates(cfg)
    assert reused.wall_time_s == 0.0 and reused.num_candidates == 3
    assert reused.compute_s == pytest.approx(base.compute_s)
    store = CandidateStore.open(base.store_uri)
    torch.testing.assert_close(final(reused, store), final(base, store), atol=0, rtol=0)
