"""Carve stage: select neurons, cluster them into experts, assemble a TinyOnn MoE and calibrate its routers."""

from tiny_onn.carve.assemble import assemble, moe_config
from tiny_onn.carve.carver import CarveConfig, carve_model, make_plan, run, summary
from tiny_onn.carve.plan import CarvePlan, LayerPlan

__all__ = ["CarveConfig", "CarvePlan", "LayerPlan", "assemble", "carve_model", "make_plan", "moe_config", "run", "summary"]
