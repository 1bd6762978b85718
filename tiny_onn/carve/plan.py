"""A carve plan: for every layer, which source neurons form the shared expert and each routed expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerPlan:
    """Neuron indices into the source layer's FFN: `shared` [S] and `experts` [E, I] (groups contiguous in E)."""

    layer: int
    shared: torch.Tensor
    experts: torch.Tensor
    groups: int = 1

    def to_json(self) -> dict:
        E = self.experts.shape[0]
        per_group = E // self.groups
        return {
            "layer": self.layer,
            "shared_expert": {"source_layer": self.layer, "neurons": self.shared.tolist()},
            "experts": [
                {"expert": e, "group": e // per_group, "source_layer": self.layer, "neurons": self.experts[e].tolist()}
                for e in range(E)
            ],
        }


@dataclass
class CarvePlan:
    layers: list[LayerPlan]
    method: str

    @property
    def num_experts(self) -> int:
        return self.layers[0].experts.shape[0]

    @property
    def expert_size(self) -> int:
        return self.layers[0].experts.shape[1]

    @property
    def shared_size(self) -> int:
        return self.layers[0].shared.numel()
