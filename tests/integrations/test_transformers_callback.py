"""twa_ray.integrations.transformers.TWACallback in a real transformers.Trainer (CPU, a tiny GPT-2)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_module  # noqa: E402

require_module("transformers")  # skipped without it, except under CI=true

from conftest import ROOT, free_port  # noqa: E402
import transformers_task as task  # noqa: E402  (tests/integrations, beside this file)
from twa_ray.core.params import ParamLayout, flatten_params, flatten_state  # noqa: E402
from twa_ray.integrations.transformers import TWACallback  # noqa: E402
from twa_ray.store import CandidateStore  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_trainer_trains_twa_and_evaluates_the_averaged_model(tmp_path):
    callback = TWACallback(every_n_steps=6, twa_epochs=1, lr=0.5)
    trainer = task.make_trainer(tmp_path, callback)  # 3 epochs of 64 / 8 = 8 steps
    model = trainer.model
    trainer.train()

    store = CandidateStore.open(tmp_path / "out" / "twa_candidates")  # default: under output_dir
    infos = [c.info for c in store.list_candidates()]
    assert [i["step"] for i in infos] == [6, 12, 18, 24] and {i["kind"] for i in infos} == {"step"}
    assert infos[0]["source"] == "transformers" and infos[1]["epoch"] == pytest.approx(1.5)
    # tied weights: lm_head.weight is transformer.wte.weight, one parameter stored once, still tied
    assert "transformer.wte.weight" in store.names and "lm_head.weight" not in store.names
    assert model.lm_head.weight is model.transformer.wte.weight

    # the raw final weights are the last candidate (step 24 is on the cadence) and kept whole
    layout = ParamLayout.from_model(model)
    raw = flatten_state(callback.raw_state_dict, layout)
    assert callback.raw_index == 3 and torch.equal(raw, store.read_flat(3))
    assert "lm_head.weight" in callback.raw_state_dict  # a state_dict a GPT-2 loads as it is

    # the model holds w(X); the coefficients moved; the TWA loss went to the Trainer's log
    twa = flatten_params(model)
    assert not torch.allclose(twa, raw) and not torch.allclose(twa, store.read().mean(0))
    assert callback.coefficients.shape == (4, len(layout.names)) and callback.coefficients.abs().max() > 0
    logged = [entry for entry in trainer.state.log_history if "twa_loss" in entry]
    assert len(logged) == 1 and logged[0]["twa_candidates"] == 4 and logged[0]["twa_steps"] == 8

    # trainer.evaluate() reports the averaged model's eval loss, not the raw weights': Trainer's eval
    # loss is the model's own mean loss times a constant (it divides by the unshifted label count)
    metrics = trainer.evaluate()
    assert trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]
    twa_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(callback.raw_state_dict)
    raw_metrics = trainer.evaluate()
    raw_ratio = raw_metrics["eval_loss"] / task.eval_loss(model, trainer.eval_dataset)
    model.load_state_dict(twa_state)
    assert raw_metrics["eval_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert metrics["eval_loss"] / task.eval_loss(model, trainer.eval_dataset) == pytest.approx(raw_ratio, rel=1e-4)
    assert callback.shard.world == 1 and callback.history[0]["steps"] == 8


class StopsAt(TrainerCallback):
    """Raises at the end of optimizer step ``step``: a training run that dies there."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"stopped at step {self.step}")


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_a_run_resumed_from_a_checkpoint_averages_the_candidates_of_both_parts(tmp_path, restore_callback_states):
    """The callback's candidates so far ride in each checkpoint's trainer_state.json: a run that
    died after step 6 and resumes from checkpoint-4 averages the candidates of steps 2 and 4 and
    those saved after step 4, not the orphan one of the dead run's step 6 (nor an earlier fit's)."""
    saving = dict(save_strategy="steps", save_steps=4, restore_callback_states_from_checkpoint=restore_callback_states)
    earlier = TWACallback(every_n_steps=12, twa_epochs=1)
    task.make_trainer(tmp_path, earlier).train()  # an earlier fit into the same store: rows 0, 1
    first = TWACallback(every_n_steps=2, twa_epochs=1, lr=0.5)
    with pytest.raises(KeyboardInterrupt):
        task.make_trainer(tmp_path, first, callbacks=[StopsAt(6)], **saving).train()
    assert first.candidate_indices == [2, 3, 4]  # steps 2, 4, 6

    callback = TWACallback(every_n_steps=2, twa_epochs=1, lr=0.5)
    trainer = task.make_trainer(tmp_path, callback, **saving)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    store = CandidateStore.open(tmp_path / "out" / "twa_candidates")
    steps = {c.index: c.info["step"] for c in store.list_candidates()}
    averaged = [c for c in trainer.callback_handler.callbacks if isinstance(c, TWACallback)]
    assert len(averaged) == 1  # the same one, or transformers' copy of it (restore_callback_states)
    done = averaged[0]
    assert done.candidate_indices[:2] == [2, 3] and 4 not in done.candidate_indices  # row 4: the orphan step 6
    assert [steps[i] for i in done.candidate_indices] == list(range(2, 25, 2))
    assert done.coefficients.shape[0] == 12 and done.arguments["every_n_steps"] == 2


def test_one_epoch_at_every_epoch_fails_before_training(tmp_path):
    callback = TWACallback(every_n_epochs=1)
    trainer = task.make_trainer(tmp_path, callback, epochs=1)
    before = flatten_params(trainer.model)
    with pytest.raises(ValueError, match=r"every_n_epochs=1 from start_epoch=0 saves 1 candidate.*at least 2"):
        trainer.train()
    assert torch.equal(flatten_params(trainer.model), before)


def test_ddp_two_processes_shard_the_projection_and_end_identical(tmp_path):
    """torchrun, 2 CPU processes (gloo): the Trainer's own ranks share the projection."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(HERE / "transformers_ddp_fit.py"), str(tmp_path)]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["batches_per_epoch"] for r in ranks] == [4, 4]
    store = CandidateStore.open(ranks[0]["store"])  # written by the main process alone
    assert store.candidate_indices() == ranks[0]["candidates"] == ranks[1]["candidates"] == [0, 1, 2, 3, 4, 5]
    shards = [r["shard"] for r in ranks]
    D = shards[0]["num_params"]
    assert shards[0]["coordinates"][0] == 0 and shards[0]["coordinates"][1] == shards[1]["coordinates"][0] > 0
    assert shards[1]["coordinates"][1] == D
    for name, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][name]), name
    assert torch.equal(ranks[0]["coefficients"], ranks[1]["coefficients"])
    raw = ranks[0]["raw_state_dict"]
    assert any(not torch.equal(raw[name], value) for name, value in ranks[0]["state_dict"].items())
