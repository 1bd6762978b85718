"""Per-token neuron selection by a low-rank predictor: the realistic counterpart of `tiny_onn.eval.oracle.neuron_oracle`.

The neuron oracle keeps, per token, the FFN neurons with the largest |h_j|·‖d_j‖ (h = act(x W_gᵀ) ⊙ x W_uᵀ), which needs
every neuron's activation — the full FFN. A predictor estimates the gate and up pre-activations from rank-r factors,
ĝ = (x A_g) B_g and û = (x A_u) B_u with A: [D, r], B: [r, F], scores |act(ĝ_j) · û_j|·‖d_j‖, and the FFN then computes
only the kept neurons (2·r·(D + F) extra multiply-adds per token instead of 3·D·F).

The factors are fitted to the source's own FFN inputs: for a projection W [F, D] and the inputs' second moment
C = E[x xᵀ], the rank-r map minimising E‖x Wᵀ − x Wᵀ P‖² over projections P of the output space is P = U_r U_rᵀ, with U_r
the top-r left singular vectors of W C^{1/2}; so A = Wᵀ U_r, B = U_rᵀ. At r ≥ rank(W) (and C of full rank) the prediction
is exact and the selection is the neuron oracle's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from tiny_onn.data import PackedData
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import swiglu_mlps
from tiny_onn.sources.architecture import patched_forwards


@dataclass
class NeuronPredictor:
    """Estimates of one SwiGLU FFN's gate and up pre-activations, and its down-projection column norms: rank-r factors,
    or (`exact_gate`) the gate rows themselves with the up pre-activation at rank r or, at rank 0, its root mean square."""

    gate_in: torch.Tensor | None  # [D, r]; None: the exact gate (gate_rows)
    gate_out: torch.Tensor | None  # [r, F]
    up_in: torch.Tensor | None  # [D, r]; None: |u_j| replaced by up_rms
    up_out: torch.Tensor | None  # [r, F]
    down_norm: torch.Tensor  # [F]
    gate_rows: torch.Tensor | None = None  # [F, D], with gate_in None
    up_rms: torch.Tensor | None = None  # [F], with up_in None

    @property
    def rank(self) -> int:
        """Rank of the factors (of the up predictor when the gate is exact; 0: none)."""
        factor = self.gate_in if self.gate_in is not None else self.up_in
        return 0 if factor is None else factor.shape[1]

    def scores(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        """Predicted |h_j|·‖d_j‖ for inputs x [..., D] -> [..., F]."""
        g = x @ self.gate_rows.T if self.gate_in is None else (x @ self.gate_in) @ self.gate_out
        u = self.up_rms if self.up_in is None else (x @ self.up_in) @ self.up_out
        return (act_fn(g) * u).abs() * self.down_norm


@torch.no_grad()
def input_second_moments(source: PreTrainedModel, data: PackedData, batch_size: int = 8) -> list[torch.Tensor]:
    """E[x xᵀ] [D, D] (float64) of every SwiGLU FFN's input over the non-padding tokens of `data`, in layer order."""
    mlps = swiglu_mlps(source)
    if not mlps:
        raise TinyOnnError("the model has no SwiGLU FFN (gate_proj/up_proj/down_proj) to fit neuron predictors to")
    device = next(source.parameters()).device
    D = mlps[0].module.gate_proj.weight.shape[1]
    sums = [torch.zeros(D, D, dtype=torch.float64) for _ in mlps]
    count = [0]
    keep: list[torch.Tensor] = []

    def hook(i: int):
        def pre_hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[keep[0]].double().cpu()  # [T, D]
            sums[i] += x.T @ x

        return pre_hook

    handles = [m.module.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        for batch in data.batches(batch_size):
            keep[:] = [batch["attention_mask"].reshape(-1).bool().to(device)]
            count[0] += int(keep[0].sum())
            source(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if count[0] == 0:
        raise TinyOnnError("no calibration tokens to fit neuron predictors on: the data is empty")
    return [s / count[0] for s in sums]


def sqrt_psd(c_DD: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative rounding-error eigenvalues set to 0)."""
    evals, evecs = torch.linalg.eigh(c_DD)
    return evecs @ torch.diag(evals.clamp_min(0.0).sqrt()) @ evecs.T


def low_rank_factors(w_FD: torch.Tensor, sqrt_c_DD: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [D, rank], B [rank, F]) with x A B the best rank-`rank` estimate of x Wᵀ for inputs whose second moment has
    the square root `sqrt_c_DD`; a rank above min(F, D) is exact, its extra factors zero."""
    u_FK, _, _ = torch.linalg.svd(w_FD.double() @ sqrt_c_DD.double(), full_matrices=False)
    u_Fr = u_FK[:, :rank]
    if u_Fr.shape[1] < rank:
        u_Fr = torch.cat([u_Fr, u_Fr.new_zeros(u_Fr.shape[0], rank - u_Fr.shape[1])], dim=1)
    return (w_FD.double().T @ u_Fr).to(w_FD.dtype), u_Fr.T.contiguous().to(w_FD.dtype)


def projection_rms(w_FD: torch.Tensor, c_DD: torch.Tensor) -> torch.Tensor:
    """Root mean square [F] (float64) of each output x·w_j of a projection W [F, D] over inputs whose second moment is
    C [D, D]: sqrt(w_j C w_jᵀ)."""
    w64 = w_FD.double()
    return ((w64 @ c_DD.double()) * w64).sum(-1).clamp_min(0.0).sqrt()


def fit_neuron_predictors(source: PreTrainedModel, data: PackedData, rank: int, batch_size: int = 8,
                          exact_gate: bool = False) -> list[NeuronPredictor]:
    """One predictor per SwiGLU FFN of `source`, fitted to its FFN inputs on `data`: rank-`rank` factors of the gate
    and up projections, or (`exact_gate`) the gate rows themselves and rank-`rank` up factors (rank 0: the up
    pre-activation's root mean square sqrt(w_j C w_jᵀ) in place of |u_j| — the "gate" router's selection)."""
    if rank < (0 if exact_gate else 1):
        raise TinyOnnError(f"the neuron predictor's rank must be at least {0 if exact_gate else 1}, got {rank}")
    moments = input_second_moments(source, data, batch_size)
    predictors = []
    for mlp, c_DD in zip(swiglu_mlps(source), moments, strict=True):
        m = mlp.module
        sqrt_c = sqrt_psd(c_DD)  # [D, D]
        with torch.no_grad():
            w_gate, w_up = m.gate_proj.weight, m.up_proj.weight  # [F, D]
            gate_in, gate_out = (None, None) if exact_gate else low_rank_factors(w_gate, sqrt_c, rank)
            up_in, up_out = low_rank_factors(w_up, sqrt_c, rank) if rank else (None, None)
            up_rms = None if rank else projection_rms(w_up, c_DD).to(w_up.dtype)  # [F]
            predictors.append(NeuronPredictor(gate_in, gate_out, up_in, up_out, m.down_proj.weight.norm(dim=0),
                                              gate_rows=w_gate.detach().clone() if exact_gate else None,
                                              up_rms=up_rms))
    return predictors


def _predicted_forward(predictor: NeuronPredictor, keep: int, candidates: int):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # [..., F]; every neuron computed: quality, not speed
        predicted = predictor.scores(x, self.act_fn)  # [..., F]
        if candidates:  # two stages: the predicted top `candidates`, then the kept ones among them by their true score
            cand = predicted.topk(candidates, dim=-1).indices  # [..., candidates]
            true = h.gather(-1, cand).abs() * predictor.down_norm[cand]
            idx = cand.gather(-1, true.topk(keep, dim=-1).indices)  # [..., keep]
        else:
            idx = predicted.topk(keep, dim=-1).indices  # [..., keep]
        mask = torch.zeros_like(h).scatter_(-1, idx, 1.0)
        return self.down_proj(h * mask)

    return forward


@contextmanager
def predicted_neurons(dense: PreTrainedModel, predictors: list[NeuronPredictor], fraction: float,
                      candidate_factor: float = 0.0) -> Iterator[PreTrainedModel]:
    """Within the block, every SwiGLU FFN of `dense` keeps per token only its round(fraction·F) neurons with the largest
    *predicted* |h_j|·‖d_j‖ (the neuron oracle with the activations estimated by `predictors`). `candidate_factor` c ≥ 1:
    two stages instead — the c·round(fraction·F) neurons of largest predicted score are candidates, and the kept ones
    are the candidates of largest true |h_j|·‖d_j‖ (a router that computes the candidates' exact up projections)."""
    if not 0.0 < fraction <= 1.0:
        raise TinyOnnError(f"the kept fraction of neurons must be in (0, 1], got {fraction}")
    if candidate_factor and candidate_factor < 1.0:
        raise TinyOnnError(f"the candidate factor must be 0 (one stage) or at least 1, got {candidate_factor}")
    mlps = [m.module for m in swiglu_mlps(dense)]
    if len(predictors) != len(mlps):
        raise TinyOnnError(f"{len(predictors)} neuron predictors for a model with {len(mlps)} SwiGLU FFNs: fit them "
                           "on this model (fit_neuron_predictors)")
    forwards = []
    for mlp, predictor in zip(mlps, predictors, strict=True):
        width = mlp.gate_proj.weight.shape[0]
        keep = max(1, math.floor(fraction * width + 0.5))
        candidates = min(width, math.floor(candidate_factor * keep + 0.5)) if candidate_factor else 0
        forwards.append(_predicted_forward(predictor, keep, candidates))
    with patched_forwards(mlps, forwards):
        yield dense
