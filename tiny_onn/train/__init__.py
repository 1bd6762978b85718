"""Train stage: expert-masked continued training (full / SMK / SMK²), distillation, two phases, PI; dense controls."""

from tiny_onn.train.optim import MaskedAdamW
from tiny_onn.train.policies import POLICIES, update_mask
from tiny_onn.train.trainer import TrainConfig, Trainer, run, summary

__all__ = ["POLICIES", "MaskedAdamW", "TrainConfig", "Trainer", "run", "summary", "update_mask"]
