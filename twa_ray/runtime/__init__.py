"""Ray: starting or joining it, one TorchTrainer builder, the two Ray Train loops, one-shot
tasks and checkpoints. What the loops do with ``torch.distributed`` is ``twa_ray.parallel``'s.

    ray_env.py          start or join Ray, quietly; cluster resources
    trainer.py          torch_trainer: the one TorchTrainer builder of every stage
    trainer_trace.py    the workers' start-up trace (benchmarks/startup.py; off by default)
    base_train.py       base training's driver (run_base_training, the full budget, read_final)
    base_loop.py        base training's Ray Train worker loop
    twa_train.py        TWA's driver (run_twa)
    twa_loop.py         TWA's Ray Train worker loop and its run state
    worker.py           what both loops share: seeding, SyncBatchNorm, fault drills, reporting
    checkpoints.py      Ray Train checkpoints in the one folder format
    checkpoint_reads.py a sharded checkpoint read where it lies (each rank its bytes)
    tasks.py            one-shot Ray tasks on one CPU or GPU
    evaluation.py       the test-split evaluation of weight vectors in Ray tasks
"""
