"""The jobs' stages as library calls: each job in ``jobs/`` reads top to bottom as one
call per stage into its module here.

- ``main``: the main job (jobs/cifar_twa.py): candidates -> TWA -> full budget -> evaluation -> run folder;
- ``soups``: the soup job (jobs/soup_twa.py): fine-tuned models -> store -> soups and TWA-v -> evaluation -> run folder;
- ``finetune``: the soup job's fine-tuned models (pretrain once, fine-tune N copies as Ray tasks);
- ``sweep``: the sweep job's test-split evaluation of its best trial (jobs/tune_twa.py);
- ``runs``: what every job does with its run folder (prepare, finished?, mark complete).
"""
