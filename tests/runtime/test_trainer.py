"""runtime.trainer: which stages get a torch.distributed process group, and the trainer built for each."""
import pytest

from twa_ray.config import TWAConfig, TrainConfig
from twa_ray.runtime.trainer import WorkerGroup, torch_trainer


@pytest.mark.parametrize("workers, use_gpu, sharding, expected", [
    (1, False, "blocks", False),  # every collective is a no-op on one CPU worker
    (2, False, "blocks", True),
    (1, True, "blocks", True),   # NCCL and the worker's device come with the process group
    (1, False, "fsdp", True),    # FSDP2's device mesh needs one, even of one rank
])
def test_a_process_group_only_where_the_loop_needs_one(workers, use_gpu, sharding, expected):
    for section in (TrainConfig(workers=workers, use_gpu=use_gpu, sharding=sharding, cpus_per_worker=1.0),
                    TWAConfig(workers=workers, use_gpu=use_gpu, sharding=sharding, cpus_per_worker=1.0)):
        assert WorkerGroup.of(section).process_group is expected


def test_one_cpu_worker_gets_the_base_trainer_and_several_the_torch_trainer(tmp_path):
    from ray.train.torch import TorchTrainer

    def loop(config):
        pass

    one = torch_trainer(loop, {}, WorkerGroup(1, 1.0, False), name="one", storage_path=str(tmp_path), max_failures=0)
    two = torch_trainer(loop, {}, WorkerGroup(2, 1.0, False), name="two", storage_path=str(tmp_path), max_failures=0)
    assert not isinstance(one, TorchTrainer) and isinstance(two, TorchTrainer)
    assert one.scaling_config.num_workers == 1 and one.run_config.name == "one"
