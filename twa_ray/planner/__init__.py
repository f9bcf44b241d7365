"""Capacity planner: memory per worker and traffic per step of sharded TWA, before launching
anything (``python -m twa_ray plan``; the arithmetic is in ``capacity``)."""

from .capacity import DATASET_SHAPES, CapacityPlan, human_bytes, model_numels, plan_capacity, plan_for_model

__all__ = ["DATASET_SHAPES", "CapacityPlan", "human_bytes", "model_numels", "plan_capacity", "plan_for_model"]
