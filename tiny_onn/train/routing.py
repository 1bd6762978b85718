"""What the routing losses need during training: each router's input (to re-route it with the input detached, so that
router losses train only the routers) and the dense teacher's per-token expert gains (router distillation's target).

Legend: N tokens (batch × positions, flattened), D hidden size, E experts, I neurons per expert, M FFN neurons.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_onn.artifacts import read_json
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import swiglu_mlps
from tiny_onn.sources.loading import weights_agree
from tiny_onn.sources.quantized import dense_weight


class RouterTaps:
    """Forward pre-hooks on each MoE block that keep its router's input of the last forward, and re-route it detached.
    (The block calls its router's methods directly, so the hooks sit on the block, not on the router.)"""

    def __init__(self, model):
        blocks = [layer.mlp for layer in model.model.layers]
        self.routers = [block.router for block in blocks]
        self.inputs: list[torch.Tensor | None] = [None] * len(self.routers)
        self.handles = [b.register_forward_pre_hook(self._keep(i)) for i, b in enumerate(blocks)]

    def _keep(self, i: int):
        router = self.routers[i]

        def hook(module, args):
            x_ND = args[0].reshape(-1, args[0].shape[-1])  # the block's input [B, T, D] as [N, D]
            self.inputs[i] = router.routing_input(x_ND).detach()

        return hook

    def log_probs(self, layer: int) -> torch.Tensor:
        """[N, E] log-probabilities of router `layer` on its last input, differentiable only in the router's weights."""
        logp_NE, _ = self.routers[layer].route(self.inputs[layer])
        return logp_NE

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def check_teacher_is_the_source(teacher, moe, neurons: list[torch.Tensor]) -> None:
    """One clear error when the teacher's FFN neurons are not those the MoE's experts were carved from (a teacher of the
    same shape with other weights would give the routers a meaningless target): the first expert's gate rows in the
    first and last layer must correlate with the teacher's rows of the same neurons (training moves them a little;
    another model's weights correlate near 0)."""
    mlps = swiglu_mlps(teacher)
    for layer in (0, len(mlps) - 1):
        idx = neurons[layer][0][:4]  # the first expert's first neurons
        taught = dense_weight(mlps[layer].gate_proj)[idx.to(mlps[layer].gate_proj.weight.device), :64]
        carved = moe.model.layers[layer].mlp.experts.gate_up_proj[0, : len(idx), :64]  # gate rows come first
        sample = [float(v) for v in taught.detach().float().reshape(-1).cpu()]
        if not weights_agree(sample, [float(v) for v in carved.detach().float().reshape(-1).cpu()], min_correlation=0.5):
            raise TinyOnnError(f"router distillation: the teacher's neurons are not those the MoE's experts were carved "
                               f"from (layer {layer}'s weights differ); use the carve's source as --teacher")


class TeacherGains:
    """Hooks on the dense teacher's FFNs that compute, at every token, the gain of each carved expert as the teacher
    would have used it: y_e = the teacher's own neurons of expert e (from the MoE's provenance) times their down-projection
    columns, R = Σ_e y_e, gain_e = 2⟨R, y_e⟩ − ‖y_e‖² — the oracle the carve calibrates routers on."""

    def __init__(self, teacher, moe_folder: str | Path, moe=None):
        provenance_path = Path(moe_folder) / "provenance.json"
        if not provenance_path.is_file():
            raise TinyOnnError(f"router distillation needs the MoE's provenance.json (which teacher neurons form each "
                               f"expert); {provenance_path} is missing")
        layers = read_json(provenance_path, "provenance")["layers"]
        mlps = swiglu_mlps(teacher)
        if len(layers) != len(mlps):
            raise TinyOnnError(f"router distillation: the MoE was carved from a model with {len(layers)} layers, the "
                               f"teacher has {len(mlps)}; use the carve's source as --teacher")
        self.gains: list[torch.Tensor | None] = [None] * len(mlps)
        self.neurons_EI, self.down_EDI = [], []
        for plan, mlp in zip(layers, mlps, strict=True):
            idx_EI = torch.tensor([e["neurons"] for e in plan["experts"]])
            down_DM = dense_weight(mlp.down_proj).float()
            if int(idx_EI.max()) >= down_DM.shape[1]:
                raise TinyOnnError("router distillation: the MoE's experts name neurons the teacher does not have; use "
                                   "the carve's source as --teacher")
            self.neurons_EI.append(idx_EI.to(down_DM.device))
            self.down_EDI.append(down_DM[:, idx_EI].permute(1, 0, 2).contiguous())  # [E, D, I]
        if moe is not None:
            check_teacher_is_the_source(teacher, moe, self.neurons_EI)
        self.handles = [m.down_proj.register_forward_pre_hook(self._gains(i)) for i, m in enumerate(mlps)]

    def _gains(self, i: int):
        def hook(module, args):
            h_NM = args[0].reshape(-1, args[0].shape[-1]).float()  # the teacher's neuron activations
            y_NED = torch.einsum("nei,edi->ned", h_NM[:, self.neurons_EI[i]], self.down_EDI[i])
            R_ND = y_NED.sum(1)
            self.gains[i] = 2 * torch.einsum("ned,nd->ne", y_NED, R_ND) - y_NED.square().sum(-1)  # [N, E]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
