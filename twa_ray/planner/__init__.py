"""Capacity planner: memory per worker and traffic per step of sharded TWA, before launching
anything (``python -m twa_ray plan``; the arithmetic is in ``capacity``, the FSDP2 mode in
``fsdp``, models given by parameter shapes in ``shapes``, a Llama-like one in ``llama``)."""

from .capacity import (DATASET_SHAPES, CapacityPlan, human_bytes, model_numels, model_shapes, plan_capacity,
                       plan_for_model)
from .fsdp import FsdpPlan, fsdp_imbalance, fsdp_unit_sizes, fsdp_units, plan_fsdp, planned_fsdp_traffic, wire_factor
from .shapes import load_shapes, write_shapes

__all__ = ["DATASET_SHAPES", "CapacityPlan", "FsdpPlan", "fsdp_imbalance", "fsdp_unit_sizes", "fsdp_units",
           "human_bytes", "load_shapes", "model_numels", "model_shapes", "plan_capacity", "plan_for_model", "plan_fsdp",
           "planned_fsdp_traffic", "wire_factor", "write_shapes"]
