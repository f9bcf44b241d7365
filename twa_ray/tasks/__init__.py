"""Tasks: the model, data, loss and metrics every stage runs on (``protocol``), the built-in
image classification, and a config's task by import path (``load``).

    task = task_from_config(cfg, stage="train")     # cfg.task: "image_classification" or "pkg.mod:Cls"
    data = task_data(task)                          # TaskData: train, val, test (sealed), train_eval, collate_fn
"""
from .batches import Totals, loss_and_sums, recalibrate_bn_by_task, to_device
from .image_classification import ImageClassification
from .load import BUILTIN, TaskError, check_task, import_task_class, model_spec, task_data, task_from_config, task_summary
from .protocol import Task, TaskBase, TaskData, missing_members

__all__ = [
    "BUILTIN", "ImageClassification", "Task", "TaskBase", "TaskData", "TaskError", "Totals", "check_task",
    "import_task_class", "loss_and_sums", "missing_members", "model_spec", "recalibrate_bn_by_task", "task_data", "task_from_config", "task_summary", "to_device",
]
