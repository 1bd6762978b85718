"""TinyOnn: a decoder LLM whose FFNs are Mixtures of Experts carved out of a dense SwiGLU model.

Organised like transformers' qwen3_moe: Router -> SparseMoeBlock (dispatch/combine) -> Experts, inside DecoderLayer,
Model and ForCausalLM. Imports only torch and transformers, so exported folders load with `trust_remote_code=True`.

Legend: N tokens (batch * sequence flattened), D hidden size, E routed experts, G expert groups, I neurons per expert,
K experts selected per token, P selected (token, expert) pairs, C tokens of the busiest expert, F = E·I.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

# transformers renamed the KV cache from `past_key_values` to `cache` (generate's kwarg, the mask helper's parameter and
# the output field); use whichever name the installed version has, so exported folders load on either side of it
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else (
    "past_key_values")

try:  # inside the tiny_onn package
    from .configuration_tiny_onn import ACTIVATION_SCORES, TinyOnnConfig
except ImportError:  # pragma: no cover - loaded as a flat module
    from configuration_tiny_onn import ACTIVATION_SCORES, TinyOnnConfig


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """How a MoE block routes right now: runtime state, not saved with the model (the config holds the saved
    defaults). Training switches `mode` for phase 1; evaluation sweeps `top_k`/`top_p`; see
    `TinyOnnForCausalLM.set_routing`."""

    mode: str = "sparse"
    """"sparse" (top-k / top-p selection) or "dense_mixture" (every expert runs, weighted by E·p)."""
    top_k: int = 2
    top_p: float = 0.0

    @classmethod
    def from_config(cls, config: TinyOnnConfig) -> RoutingSettings:
        return cls(mode=config.moe_mode, top_k=config.num_experts_per_tok, top_p=config.router_top_p)

    def checked(self, num_experts: int) -> RoutingSettings:
        if self.mode not in ("sparse", "dense_mixture"):
            raise ValueError(f"routing mode must be 'sparse' or 'dense_mixture', got {self.mode!r}")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the model's {num_experts} experts, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        return self


@dataclasses.dataclass
class GatePreactivations:
    """What a "gate" router computes once per forward, for its scores and for the experts: every routed neuron's gate
    pre-activation x·g_j [N, E·I] and, with `router_candidates`, each token's candidate experts [N, M] and the exact up
    pre-activations x·u_j of their neurons [N, E·I] (zero for every other neuron). All float32."""

    gate_NF: torch.Tensor
    up_NF: torch.Tensor | None = None
    candidates_NM: torch.Tensor | None = None


@dataclasses.dataclass
class TinyOnnModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus each layer's expert selection [N, E] (booleans) and, in training mode, the
    routers' z-loss averaged over layers."""

    expert_selections: tuple[torch.Tensor, ...] | None = None
    router_z_loss: torch.Tensor | None = None


@dataclasses.dataclass
class TinyOnnCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the routers' z-loss (training mode only; ST-MoE)."""

    router_z_loss: torch.Tensor | None = None


class TinyOnnAttention(nn.Module):
    """Llama attention, plus Qwen3's per-head q/k RMSNorm when `config.use_qk_norm` (the only difference we need)."""

    def __init__(self, config: TinyOnnConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias
        )
        if config.use_qk_norm:  # unlike Llama: Qwen3 normalises each head's queries and keys
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=self.config.sliding_window, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


_BAG_OFFSETS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def bag_products(rows_XR: torch.Tensor, table_TC: torch.Tensor, weights_XR: torch.Tensor) -> torch.Tensor:
    """Σ_r weights[x, r] · table[rows[x, r]] for every bag x -> [X, C]: a matrix product read as weighted sums of a
    transposed weight's rows (embedding_bag's per-sample-weighted sum). On CPU this reads the weight rows 1.5-1.9x
    faster than MKL's matrix-vector product (benchmarks/moe_speed.py, the dense FFNs on it), and it reads only the rows
    it is given, so a token's selected experts are read in place, without copies. Calls the op directly, with cached
    bag offsets: in decode the functional wrapper's checks and offsets cost as much as the product."""
    X, R = rows_XR.shape
    key = (X, R, rows_XR.device)
    offsets_X = _BAG_OFFSETS.get(key)
    if offsets_X is None:
        offsets_X = _BAG_OFFSETS.setdefault(key, torch.arange(0, X * R, R, device=rows_XR.device))
    mode_sum = 0
    return torch.embedding_bag(table_TC, rows_XR.reshape(-1), offsets_X, False, mode_sum, False,
                               weights_XR.reshape(-1), False, None)[0]


def bag_kernel_applies(x: torch.Tensor, weight: torch.Tensor, dtype: bool = True) -> bool:
    """Whether the decode kernel (`bag_products` over cached transposed weights) can take a call on x reading `weight`:
    CPU, nothing for autograd to record (and, `dtype`, x in the weight's dtype). Callers check their token limit."""
    if x.device.type != "cpu" or dtype and x.dtype != weight.dtype:
        return False
    if weight.is_inference():  # weights made under torch.inference_mode keep no version counter to watch
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class DecodeTables:
    """Transposed copies of a module's weights for the decode kernel, built on first use and rebuilt whenever one of
    the weights changes (its version counter, storage, dtype or device): an optimizer step, `load_state_dict`, `.to`.
    They double the memory of the weights they copy while they exist; entering training mode drops them."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._tables: tuple[torch.Tensor, ...] = ()

    def get(self, params: tuple[torch.Tensor, ...], build: Callable[[], tuple[torch.Tensor, ...]]):
        key = tuple((-1 if p.is_inference() else p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if key != self._key:
            self._tables, self._key = (), None  # the old copies go before the new ones are made
            with torch.no_grad():
                self._tables = tuple(t.contiguous() for t in build())
            self._key = key
        return self._tables

    def clear(self) -> None:
        self._key, self._tables = None, ()


class DecodeKernelModule(nn.Module):
    """A module that may run the decode kernel: it holds the cached copies (`decode_tables`) and drops them on entering
    training mode. `bag_max_tokens`: the most tokens a call may have to take the kernel (0: never)."""

    bag_max_tokens = 1

    def __init__(self) -> None:
        super().__init__()
        self.decode_tables = DecodeTables()

    def train(self, mode: bool = True) -> DecodeKernelModule:
        if mode:
            self.decode_tables.clear()
        return super().train(mode)


class TinyOnnMLP(DecodeKernelModule):
    """A dense SwiGLU FFN (the always-on shared expert). On CPU without autograd, up to `bag_max_tokens` tokens (decode)
    run through the decode kernel (`bag_products`) on cached transposed weights (`DecodeTables`); 0 turns it off."""

    def __init__(self, config: TinyOnnConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        if x.numel() // D <= self.bag_max_tokens and bag_kernel_applies(x, self.down_proj.weight):
            return self._bag_forward(x.reshape(-1, D)).view(x.shape)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _bag_forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        N, D = x_ND.shape
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        gate_up_T, down_rows, rows_D, rows_S = self.decode_tables.get(weights, lambda: (
            torch.cat(weights[:2]).T,  # [D, 2S]
            weights[2].T,  # [S, D]
            torch.arange(D, device=x_ND.device),
            torch.arange(weights[2].shape[1], device=x_ND.device),
        ))
        S = down_rows.shape[0]
        h_N2S = bag_products(rows_D.expand(N, D), gate_up_T, x_ND.contiguous())
        a_NS = self.act_fn(h_N2S[:, :S]) * h_N2S[:, S:]
        threads = torch.get_num_threads()
        if threads > N and S % threads == 0:
            # the kernel splits its work by bag: a token's neurons as one bag per thread, summed
            C = S // threads
            return bag_products(rows_S.view(threads, C).repeat(N, 1), down_rows, a_NS.reshape(N * threads, C)).view(
                N, threads, D).sum(1)
        return bag_products(rows_S.expand(N, S), down_rows, a_NS)


# a two-stage gate router's logit for experts outside a token's candidates: below any candidate's (log 1e-12 at the
# least), finite so that log-probabilities stay finite for the losses that read them
NON_CANDIDATE_LOGIT = math.log(1e-12) - 30.0


def _grouped_mm_supported(x: torch.Tensor, inter: int) -> bool:
    """Whether `torch._grouped_mm` (one kernel for all experts, no host sync) runs here: CUDA bf16 on compute capability
    >= 9.0 (Hopper or newer), with every matrix stride a multiple of 16 bytes."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9 and (inter * x.element_size()) % 16 == 0 and (
        x.shape[-1] * x.element_size()
    ) % 16 == 0


def _norms(a_XI: torch.Tensor, aG_XI: torch.Tensor) -> torch.Tensor:
    """Norms of expert outputs y = W_down a from the activations a and a·G (G = W_downᵀ W_down): ||y|| = sqrt(aᵀ G a)."""
    return (aG_XI * a_XI).sum(-1).clamp_min(0.0).sqrt()


def _idle_experts(num_experts: int, spans: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """The experts no pair selected: their gradients are never written by `ExpertGroupsFunction.backward`."""
    busy = torch.zeros(num_experts, dtype=torch.bool)
    busy[[e for e, _, _ in spans]] = True
    return (~busy).nonzero().squeeze(1).to(device)


def _zeroed_at(grad_E: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """grad_E with the given experts' slices zeroed (in place)."""
    return grad_E.index_fill_(0, experts, 0.0) if experts.numel() else grad_E


class ExpertGroupsFunction(torch.autograd.Function):
    """The selected experts on their tokens, with forward and backward written out expert by expert.

    Inputs: the tokens x [N, D], the experts' fused weights gate_up [E, 2I, D] and down [E, D, I], one weight per pair
    (or None), the pairs' tokens sorted by expert [P] and each expert's pair count (a list, summing to P). Returns the
    summed outputs [N, D] and the pairs' activations a [P, I] (not differentiable; for the statistics).

    Autograd over the per-expert loop records ~10 nodes per expert and keeps one [n, D] input copy per expert; here
    backward makes one pass over the experts with every product written into preallocated gradients (no full-size
    zero gradient per expert, no [P, D] buffers), and the inputs are gathered again, into one reused scratch buffer
    (CPU training with many narrow experts, where per-node overhead and allocations dominate the small GEMMs)."""

    @staticmethod
    def forward(ctx, x_ND, gate_up, down, weight_P, token_P, counts, act_fn):
        E, I2, D = gate_up.shape
        inter = I2 // 2
        spans = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, accumulate(counts), strict=True)) if n]
        scratch = x_ND.new_empty(max(counts, default=0), D)  # one expert's gathered inputs, then its outputs
        h_P2I = x_ND.new_empty(token_P.numel(), I2)
        for e, start, end in spans:
            x_nD = torch.index_select(x_ND, 0, token_P[start:end], out=scratch[: end - start])
            torch.mm(x_nD, gate_up[e].T, out=h_P2I[start:end])
        a_PI = act_fn(h_P2I[:, :inter]) * h_P2I[:, inter:]
        aw_PI = a_PI if weight_P is None else a_PI * weight_P[:, None].to(a_PI.dtype)
        y_ND = torch.zeros_like(x_ND)
        for e, start, end in spans:
            y_nD = torch.mm(aw_PI[start:end], down[e].T, out=scratch[: end - start])
            y_ND.index_add_(0, token_P[start:end], y_nD)
        ctx.save_for_backward(x_ND, gate_up, down, weight_P, token_P, h_P2I, a_PI)
        ctx.spans, ctx.act_fn = spans, act_fn
        ctx.mark_non_differentiable(a_PI)
        return y_ND, a_PI

    @staticmethod
    def backward(ctx, dy_ND, _da_unused):
        x_ND, gate_up, down, weight_P, token_P, h_P2I, a_PI = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_weight = ctx.needs_input_grad[:4]
        inter = down.shape[-1]
        dy_ND = dy_ND.contiguous()
        scratch = x_ND.new_empty(max((end - start for _, start, end in ctx.spans), default=0), x_ND.shape[1])
        aw_PI = a_PI if weight_P is None else a_PI * weight_P[:, None].to(a_PI.dtype)
        da_PI = torch.empty_like(a_PI)
        # the down projections' gradients as [E, I, D] (aᵀ·dy is the fast orientation of that small GEMM)
        # every expert with pairs writes its whole gradient below (out=), so only the idle experts' are zeroed
        idle = _idle_experts(down.shape[0], ctx.spans, down.device)
        g_down_EID = _zeroed_at(down.new_empty(down.shape[0], inter, down.shape[1]), idle) if need_down else None
        for e, start, end in ctx.spans:
            dy_nD = torch.index_select(dy_ND, 0, token_P[start:end], out=scratch[: end - start])
            torch.mm(dy_nD, down[e], out=da_PI[start:end])
            if need_down:
                torch.mm(aw_PI[start:end].T, dy_nD, out=g_down_EID[e])
        g_weight = (da_PI * a_PI).sum(1).to(weight_P.dtype) if need_weight else None
        if weight_P is not None:
            da_PI = da_PI * weight_P[:, None].to(da_PI.dtype)
        with torch.enable_grad():  # the activation's derivative, on all pairs at once
            h = h_P2I.detach().requires_grad_(True)
            (dh_P2I,) = torch.autograd.grad(ctx.act_fn(h[:, :inter]) * h[:, inter:], h, da_PI)
        g_gate_up = _zeroed_at(torch.empty_like(gate_up), idle) if need_gate_up else None
        dx_ND = torch.zeros_like(x_ND) if need_x else None
        for e, start, end in ctx.spans:
            tokens = token_P[start:end]
            if need_gate_up:
                x_nD = torch.index_select(x_ND, 0, tokens, out=scratch[: end - start])
                torch.mm(dh_P2I[start:end].T, x_nD, out=g_gate_up[e])
            if need_x:
                dx_ND.index_add_(0, tokens, torch.mm(dh_P2I[start:end], gate_up[e], out=scratch[: end - start]))
        g_down = None if g_down_EID is None else g_down_EID.transpose(1, 2)
        return dx_ND, g_gate_up, g_down, g_weight, None, None, None


class TinyOnnExperts(DecodeKernelModule):
    """E equal-size SwiGLU experts stored as fused 3-D tensors, with several ways to run the selected ones.

    `forward` computes, for every token n, the sum over its selected experts e of w_ne · expert_e(x_n) (w = 1 when no
    weights are given); every path computes that same function (tests/model/test_dispatch.py), they differ in speed.
    `path` picks one ("auto": by device and shape, see `pick_path`). Routing weights scale the activations before the
    down projection, and the statistics come from the Gram matrices of the down projections, so no path has to keep one
    output row per (token, expert) pair:
    - "dense": every expert on every token (one GEMM per projection), unselected pairs weighted 0; for top-k = E, and
      on CPU from 2 tokens on unless experts are wide and busy: nearly every expert is touched by then, and two GEMMs
      beat per-expert work (benchmarks/moe_paths.py).
    - "loop": the selected experts one after another, tokens grouped by one sort (CPU: one-token decode with few
      experts, reading each selected expert in place).
    - "fused": the loop as one autograd node, `ExpertGroupsFunction`, whose backward is written out per expert into
      preallocated gradients (CPU training once experts are busy enough; benchmarks/moe_speed.py).
    - "sorted": the pairs sorted by expert and gathered once into [P, D]; each expert's contiguous rows through its two
      GEMMs, written in place into one [P, D] output (no grad), summed per token by one index_add (CPU prefill: fewer,
      larger copies than the loop's per-expert gathers and adds).
    - "bag": CPU decode without autograd: each selected (token, expert) pair's gate and up pre-activations as one
      weighted sum of rows of a cached transposed copy of the experts' weights, and each token's down projection as one
      weighted sum of its selected neurons' down rows (`bag_products`: two calls per block, the selected rows read in
      place, no host sync, no Python loop). Under autograd, with statistics tracked or with a gate router's
      pre-activations handed over, it runs "gather" instead.
    - "gather": copy each token's selected experts (index_select), two batched matmuls; no host sync, no Python loop
      (CUDA with few tokens).
    - "padded": tokens grouped into an [E, C, D] batch (C = the busiest expert's count), batched matmuls (CUDA without
      grouped GEMM; on CPU its cost follows the routing imbalance).
    - "grouped_mm": `torch._grouped_mm` on the expert-sorted tokens, no host sync (CUDA bf16, Hopper or newer).
    Under autograd, "loop" and "padded" run the down projection of narrow experts (`dense_down_max_inter`) as one GEMM
    over a zero-filled [N, E·I] activation matrix: more FLOPs, but no [P, D] outputs to write, sum and differentiate.
    """

    path = "auto"
    # thresholds of the "auto" choice, measured by benchmarks/moe_paths.py and moe_speed.py (an instance may override)
    # CPU without autograd: the bag path up to this many tokens (0: off, and no cached copies); it beats the GEMM paths
    # up to 128-256 tokens at every layout of moe_speed.py (benchmarks/moe_paths.py), as it reads only the selected rows
    bag_max_tokens = 128
    # one-neuron experts: rows of two floats make the bag's gate and up calls slower than the gather path's copies
    bag_min_inter = 2
    loop_max_experts = 4  # one-token decode on CPU under autograd: the loop over at most this many experts, else gather
    gather_max_tokens = 8  # CUDA: up to this many tokens, the gather path
    # CPU inference beyond the bag path: the sorted path for experts at least this wide once their average tokens ×
    # width reach this (e.g. 11 tokens each at width 96, 43 at width 24), else dense
    sorted_min_inter = 24
    sorted_min_rows_x_width = 1024
    # CPU training, 2+ tokens: the fused per-expert path for experts at least this wide once their average tokens ×
    # width reach this (e.g. 22 tokens each at width 96, 171 at width 12), else dense; narrower experts stay dense
    fused_min_inter = 12
    fused_min_rows_x_width = 2048
    dense_down_max_inter = 32  # loop and padded paths under autograd: experts this narrow use the dense down projection

    def __init__(self, config: TinyOnnConfig):
        super().__init__()
        E, inter, D = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, D))  # [E, 2I, D]: rows [:I] gate, [I:] up
        self.down_proj = nn.Parameter(torch.empty(E, D, inter))  # [E, D, I]
        self.act_fn = ACT2FN[config.hidden_act]
        # training statistics (SMK²): summed norm of each expert's routed outputs and routed token counts, while tracking
        self.track_stats = False
        self.output_norm_sum: torch.Tensor | None = None  # [E], created by reset_stats
        self.routed_count: torch.Tensor | None = None  # [E]

    def reset_stats(self) -> None:
        self.output_norm_sum = torch.zeros(self.num_experts, device=self.down_proj.device)
        self.routed_count = torch.zeros(self.num_experts, device=self.down_proj.device)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, D] -> [n, D] (differentiable)."""
        h = torch.mm(x, self.gate_up_proj[e].T)  # [n, 2I]
        inter = self.down_proj.shape[-1]
        return torch.mm(self.act_fn(h[:, :inter]) * h[:, inter:], self.down_proj[e].T)

    def pick_path(self, tokens: int, k: int, x: torch.Tensor, grad: bool | None = None, bag: bool = True) -> str:
        """The path `forward` takes for `tokens` tokens with k selected experts each; `grad`: whether autograd records
        the call (None: as it would now, from the grad mode and whether x or the weights require grad); `bag`: whether
        the bag path may be picked (`forward` asks again without it where it does not apply)."""
        if self.path != "auto":
            return self.path
        if grad is None:
            grad = torch.is_grad_enabled() and (x.requires_grad or self.down_proj.requires_grad)
        inter = self.down_proj.shape[-1]
        if k == self.num_experts:
            return "dense"
        if x.is_cuda:
            if tokens <= self.gather_max_tokens:
                return "gather"
            return "grouped_mm" if _grouped_mm_supported(x, inter) else "padded"
        if bag and not grad and tokens <= self.bag_max_tokens and inter >= self.bag_min_inter:
            return "bag"
        if tokens == 1:
            # reads each selected expert in place; with many selected experts their copies cost less than the loop
            return "loop" if k <= self.loop_max_experts else "gather"
        if (not grad and inter >= self.sorted_min_inter
                and tokens * k * inter >= self.sorted_min_rows_x_width * self.num_experts):
            # inference, each expert's GEMMs large enough (tokens per expert × width) to beat computing every expert
            return "sorted"
        if grad and inter >= self.fused_min_inter and tokens * k * inter >= self.fused_min_rows_x_width * self.num_experts:
            return "fused"  # not padded: its batch is as long as the busiest expert's, so its cost follows the imbalance
        # from 2 tokens on, nearly every expert is touched: computing all of them in two GEMMs beats per-expert work
        return "dense"

    def forward(
        self,
        x_ND: torch.Tensor,
        idx_NK: torch.Tensor,
        weight_NK: torch.Tensor | None = None,
        keep_NK: torch.Tensor | None = None,
        out_ND: torch.Tensor | None = None,
        pre: GatePreactivations | None = None,
        shared: TinyOnnMLP | None = None,
    ) -> torch.Tensor:
        """Sum over each token's selected experts `idx_NK` (only where `keep_NK`, when given) of their outputs times
        `weight_NK` (None: weight 1), added to `out_ND` when given (without autograd some paths add into it in place,
        so hand over a buffer of your own) and to the output of `shared` (the block's shared expert: the bag path
        folds it into its own two calls, the other paths run it first). `pre`: a gate router's pre-activations, when
        the caller already has them; the dense and gather paths then compute only the up projections (none, when
        `pre` holds them too), the others ignore it."""
        N, K = idx_NK.shape
        path = self.pick_path(N, K, x_ND)
        if path == "bag" and (self.track_stats or pre is not None or weight_NK is not None and weight_NK.requires_grad
                              or not bag_kernel_applies(x_ND, self.down_proj)):
            # the same function, differentiable, with statistics and gate pre-activations
            path = "gather" if self.path == "bag" else self.pick_path(N, K, x_ND, bag=False)
        if keep_NK is not None and path in ("bag", "dense", "gather"):  # these paths weight unkept pairs 0
            keep = keep_NK.to(x_ND.dtype if weight_NK is None else weight_NK.dtype)
            weight_NK = keep if weight_NK is None else weight_NK * keep
        if path == "bag":
            y_ND = self._bag(x_ND, idx_NK, weight_NK, shared)
            return y_ND if out_ND is None else out_ND.add_(y_ND)
        if shared is not None:
            out_ND = shared(x_ND) if out_ND is None else out_ND + shared(x_ND)
        gram = None
        if self.track_stats:
            if self.output_norm_sum is None:
                self.reset_stats()
            with torch.no_grad():
                d = self.down_proj.detach().float()
                gram = torch.bmm(d.transpose(1, 2), d)  # [E, I, I]
        if path in ("dense", "gather"):
            run = self._dense if path == "dense" else self._gather
            y_ND = run(x_ND, idx_NK, weight_NK, keep_NK, out_ND, gram, pre)
        elif path == "loop" and N == 1:  # decode: no pairs to sort
            expert_K, weight_K = idx_NK[0], None if weight_NK is None else weight_NK[0]
            if keep_NK is not None:
                expert_K, weight_K = expert_K[keep_NK[0]], None if weight_K is None else weight_K[keep_NK[0]]
            y_ND = self._loop_one_token(x_ND, expert_K, weight_K, out_ND, gram)
        else:
            token_P, expert_P, weight_P = self._pairs(idx_NK, weight_NK, keep_NK)
            run = {"loop": self._loop, "fused": self._fused, "sorted": self._sorted, "padded": self._padded,
                   "grouped_mm": self._grouped_mm}[path]
            y_ND = run(x_ND, token_P, expert_P, weight_P, out_ND, gram)
        return y_ND

    @staticmethod
    def _pairs(idx_NK, weight_NK, keep_NK):
        """Flatten the selection to (token, expert, weight) per selected pair [P], dropping pairs that are not kept."""
        N, K = idx_NK.shape
        expert_P = idx_NK.reshape(-1)
        token_P = torch.arange(N, device=idx_NK.device).repeat_interleave(K)
        weight_P = None if weight_NK is None else weight_NK.reshape(-1)
        if keep_NK is not None:
            kept = keep_NK.reshape(-1).nonzero().squeeze(1)  # top-p: a host sync for the number of pairs
            expert_P, token_P = expert_P[kept], token_P[kept]
            weight_P = None if weight_P is None else weight_P[kept]
        return token_P, expert_P, weight_P

    def _activations(self, h: torch.Tensor) -> torch.Tensor:
        inter = self.down_proj.shape[-1]
        return self.act_fn(h[..., :inter]) * h[..., inter:]

    def _record(self, norms_E: torch.Tensor, counts_E: torch.Tensor) -> None:
        self.output_norm_sum += norms_E.float()
        self.routed_count += counts_E.float()

    @torch.no_grad()
    def _record_expert(self, e: int, a_nI: torch.Tensor, gram: torch.Tensor) -> None:
        """Statistics of expert e from its activations on its n routed tokens."""
        a32 = a_nI.detach().float()
        self.output_norm_sum[e] += _norms(a32, a32 @ gram[e]).sum()
        self.routed_count[e] += a32.shape[0]

    def _down_flat(self) -> torch.Tensor:
        E, D, inter = self.down_proj.shape
        if inter == 1:  # one-neuron experts: [E, D] rows transposed, a view (no copy of the weights per call)
            return self.down_proj.view(E, D).T
        return self.down_proj.permute(1, 0, 2).reshape(D, E * inter)  # [D, E·I], a copy

    def _up_rows(self) -> torch.Tensor:
        """The up projection rows [E, I, D] (a strided view of `gate_up_proj`)."""
        return self.gate_up_proj[:, self.down_proj.shape[-1]:]

    def _dense(self, x_ND, idx_NK, weight_NK, keep_NK, out_ND, gram, pre=None):
        N, D = x_ND.shape
        E, I2, _ = self.gate_up_proj.shape
        if pre is None:
            h = F.linear(x_ND, self.gate_up_proj.reshape(E * I2, D)).view(N, E, I2)  # [N, E, 2I]
            a = self._activations(h)  # [N, E, I]
        else:  # gate pre-activations given: the up GEMM only (one-neuron experts: the rows are a view, no copy)
            if pre.up_NF is None:
                up = F.linear(x_ND, self._up_rows().reshape(E * I2 // 2, D)).view(N, E, I2 // 2)  # [N, E, I]
            else:  # the candidates' up pre-activations too (the selected experts are candidates)
                up = pre.up_NF.view(N, E, I2 // 2).to(x_ND.dtype)
            a = self.act_fn(pre.gate_NF.view(N, E, I2 // 2).to(up.dtype)) * up
        masked = keep_NK is not None or idx_NK.shape[1] < E  # some (token, expert) pairs are not selected
        selected = torch.ones(N, E, dtype=torch.bool, device=x_ND.device)
        if masked:
            selected = torch.zeros_like(selected).scatter_(1, idx_NK, True if keep_NK is None else keep_NK)
        if gram is not None:
            with torch.no_grad():
                a_ENI = a.detach().float().transpose(0, 1)
                norms_EN = _norms(a_ENI, torch.bmm(a_ENI, gram)) * selected.T
                self._record(norms_EN.sum(1), selected.sum(0))
        if weight_NK is not None:  # weights in expert order, 0 where not selected
            w_NE = weight_NK.new_zeros(N, E).scatter(1, idx_NK, weight_NK)
            a = a * w_NE[:, :, None].to(a.dtype)
        elif masked:
            a = a * selected[:, :, None].to(a.dtype)
        inter = self.down_proj.shape[-1]
        if N <= inter:  # noqa: SIM300 (tokens vs the expert width)
            # few tokens: per-expert products summed ([E, N, D], small) cost less than the [D, E·I] copy below
            y_ND = torch.bmm(a.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)
            return y_ND if out_ND is None else out_ND + y_ND
        a_NF = a.reshape(N, -1)  # [N, E·I]
        if out_ND is None:
            return F.linear(a_NF, self._down_flat())
        return torch.addmm(out_ND, a_NF, self._down_flat().T)

    def _gather(self, x_ND, idx_NK, weight_NK, keep_NK, out_ND, gram, pre=None):
        N, K = idx_NK.shape
        E, I2, D = self.gate_up_proj.shape
        flat = idx_NK.reshape(-1)  # [N·K]
        if pre is None:
            gate_up = self.gate_up_proj.index_select(0, flat).view(N, K * I2, D)  # each token's experts, stacked
            a = self._activations(torch.bmm(gate_up, x_ND[:, :, None]).view(N, K, I2))  # [N, K, I]
        else:  # gate pre-activations given: gather only the up rows (or their given values), and the gate values
            inter = I2 // 2
            idx_NKI = idx_NK[:, :, None].expand(N, K, inter)
            if pre.up_NF is None:
                rows = self._up_rows()  # [E, I, D], a strided view; one-neuron experts: as [E, D] (a faster gather)
                up = (rows.squeeze(1) if inter == 1 else rows).index_select(0, flat).view(N, K * inter, D)
                up_NKI = torch.bmm(up, x_ND[:, :, None]).view(N, K, inter)
            else:
                up_NKI = pre.up_NF.view(N, E, inter).gather(1, idx_NKI).to(x_ND.dtype)
            g_NKI = pre.gate_NF.view(N, E, inter).gather(1, idx_NKI)
            a = self.act_fn(g_NKI.to(up_NKI.dtype)) * up_NKI  # [N, K, I]
        if gram is not None:
            with torch.no_grad():
                a32 = a.detach().float().view(N * K, 1, -1)
                norms = _norms(a32, torch.bmm(a32, gram.index_select(0, flat))).view(-1)  # [N·K]
                kept = torch.ones_like(norms) if keep_NK is None else keep_NK.reshape(-1).float()
                self._record(torch.zeros(E, device=a.device).index_add_(0, flat, norms * kept),
                             torch.zeros(E, device=a.device).index_add_(0, flat, kept))
        if weight_NK is not None:
            a = a * weight_NK[:, :, None].to(a.dtype)
        inter = a.shape[-1]
        if inter == 1:  # one-neuron experts: each token's output is a weighted sum of down columns, read in place
            y_ND = F.embedding_bag(idx_NK, self.down_proj.reshape(E, D), per_sample_weights=a.view(N, K), mode="sum")
            return y_ND if out_ND is None else out_ND + y_ND
        # one GEMV per selected (token, expert) on the gathered [D, I] blocks, then a sum over each token's experts
        # (not one GEMV per token over its experts side by side: that needs a transposed [N, D, K·I] copy of them)
        y_NKD = torch.bmm(self.down_proj.index_select(0, flat), a.reshape(N * K, inter, 1)).view(N, K, D)
        y_ND = y_NKD.sum(1)
        return y_ND if out_ND is None else out_ND + y_ND

    def _bag_tables(self, shared: TinyOnnMLP | None) -> tuple[torch.Tensor, ...]:
        """The bag path's tables: gate and up columns [U·D, 2I] (row u·D + d: unit u's gate and up weights on input
        dimension d), down rows [U·I, D] (row u·I + i: neuron i of unit u), each unit's row numbers in them, [U, D]
        and [U, I], and the shared expert's units [M]. Units: the E experts, then the shared expert's S neurons cut
        into M = ⌈S / I⌉ units of I (the last one padded with zero neurons, which add nothing)."""
        weights = (self.gate_up_proj, self.down_proj)
        if shared is not None:
            weights += (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)

        def build() -> tuple[torch.Tensor, ...]:
            E, I2, D = self.gate_up_proj.shape
            inter = I2 // 2
            gate_up, down = self.gate_up_proj, self.down_proj  # [E, 2I, D], [E, D, I]
            if shared is not None:
                g, u, d = weights[2:]  # [S, D], [S, D], [D, S]
                M = -(-g.shape[0] // inter)
                pad = M * inter - g.shape[0]
                g, u = F.pad(g, (0, 0, 0, pad)).view(M, inter, D), F.pad(u, (0, 0, 0, pad)).view(M, inter, D)
                gate_up = torch.cat([gate_up, torch.cat([g, u], dim=1)])  # [E + M, 2I, D]
                down = torch.cat([down, F.pad(d, (0, pad)).view(D, M, inter).transpose(0, 1)])  # [E + M, D, I]
            U, device = gate_up.shape[0], gate_up.device
            return (gate_up.transpose(1, 2).reshape(U * D, I2),  # [U·D, 2I]
                    down.transpose(1, 2).reshape(U * inter, D),  # [U·I, D]
                    torch.arange(U * D, device=device).view(U, D),
                    torch.arange(U * inter, device=device).view(U, inter),
                    torch.arange(E, U, device=device))

        return self.decode_tables.get(weights, build)

    def _bag(self, x_ND, idx_NK, weight_NK, shared):
        gate_up_cols, down_rows, rows_UD, neurons_UI, shared_M = self._bag_tables(shared)
        N, D = x_ND.shape
        if shared is not None:  # the shared expert's units: selected by every token, weight 1
            M = shared_M.shape[0]
            idx_NK = torch.cat([idx_NK, shared_M.expand(N, M)], dim=1)
            if weight_NK is not None:
                weight_NK = torch.cat([weight_NK, weight_NK.new_ones(N, M)], dim=1)
        K, inter = idx_NK.shape[1], neurons_UI.shape[1]
        flat = idx_NK.reshape(-1)  # [N·K]
        x_PD = x_ND[:, None, :].expand(N, K, D)  # each pair's input, weighting its unit's rows
        h_P2I = bag_products(rows_UD.index_select(0, flat), gate_up_cols, x_PD)  # [N·K, 2I]
        a_PI = self._activations(h_P2I)
        if weight_NK is not None:
            a_PI = a_PI * weight_NK.reshape(-1, 1).to(a_PI.dtype)
        if torch.get_num_threads() <= N:
            # each token: one bag over its K units' neurons, weighted by their activations
            return bag_products(neurons_UI.index_select(0, flat).view(N, K * inter), down_rows, a_PI.view(N, K * inter))
        # fewer tokens than threads (decode): the kernel splits its work by bag, so one bag per (token, unit), summed
        return bag_products(neurons_UI.index_select(0, flat), down_rows, a_PI).view(N, K, D).sum(1)

    def _loop(self, x_ND, token_P, expert_P, weight_P, out_ND, gram):
        """The selected experts one after another (one sort; the host learns the counts). Without autograd each expert
        gathers its own tokens and adds its outputs right away (per-pair copies small enough for the CPU caches); with
        autograd one gather split into per-expert views, so that backward adds one gradient, not one per expert."""
        E, inter = self.num_experts, self.down_proj.shape[-1]
        order = torch.argsort(expert_P, stable=True)
        token_sorted, expert_sorted = token_P[order], expert_P[order]
        counts = torch.bincount(expert_P, minlength=E).tolist()
        ends = list(accumulate(counts))
        # views taken once (unbind, split): indexing or slicing per expert would make backward build one full-size zero
        # gradient per expert (cost ~ E², as the number of pairs grows with E at a fixed active fraction)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        w_parts = None if weight_P is None else weight_P[order].split(counts)
        autograd = torch.is_grad_enabled() and (x_ND.requires_grad or self.down_proj.requires_grad or weight_P is not None
                                                 and weight_P.requires_grad)
        x_parts = x_ND.index_select(0, token_sorted).split(counts) if autograd else None  # [n_e, D] per expert
        dense_down = autograd and inter <= self.dense_down_max_inter
        if out_ND is None:
            out_ND = torch.zeros_like(x_ND)
        parts = []  # per expert: activations (dense_down) or outputs (autograd)
        for e, n in enumerate(counts):
            if not n:
                continue
            tokens = token_sorted[ends[e] - n : ends[e]]
            x_e = x_parts[e] if autograd else x_ND.index_select(0, tokens)
            a = self._activations(F.linear(x_e, gate_up[e]))  # [n, I]
            if gram is not None:
                self._record_expert(e, a, gram)
            if w_parts is not None:
                a = a * w_parts[e][:, None].to(a.dtype)
            if dense_down:
                parts.append(a)
            elif autograd:
                parts.append(F.linear(a, down[e]))  # [n, D]
            else:
                out_ND.index_add_(0, tokens, F.linear(a, down[e]))  # in place: out_ND is this call's own buffer
        if dense_down:
            return self._dense_down(torch.cat(parts), token_sorted, expert_sorted, x_ND.shape[0], out_ND)
        return out_ND.index_add(0, token_sorted, torch.cat(parts)) if autograd else out_ND

    def _fused(self, x_ND, token_P, expert_P, weight_P, out_ND, gram):
        """The loop path as one autograd node (`ExpertGroupsFunction`): one sort, the host learns the counts."""
        order = torch.argsort(expert_P, stable=True)
        token_sorted, expert_sorted = token_P[order], expert_P[order]
        counts = torch.bincount(expert_P, minlength=self.num_experts).tolist()
        w_sorted = None if weight_P is None else weight_P[order]
        y_ND, a_PI = ExpertGroupsFunction.apply(x_ND, self.gate_up_proj, self.down_proj, w_sorted, token_sorted, counts,
                                                self.act_fn)
        if gram is not None:
            with torch.no_grad():
                a32 = a_PI.float()
                aG = torch.empty_like(a32)
                for e, (n, end) in enumerate(zip(counts, accumulate(counts), strict=True)):
                    if n:
                        torch.mm(a32[end - n : end], gram[e], out=aG[end - n : end])
                E = self.num_experts
                self._record(torch.zeros(E, device=a32.device).index_add_(0, expert_sorted, _norms(a32, aG)),
                             torch.tensor(counts, dtype=torch.float32, device=a32.device))
        return y_ND if out_ND is None else out_ND + y_ND

    def _sorted(self, x_ND, token_P, expert_P, weight_P, out_ND, gram):
        """Pairs sorted by expert, one gather of their inputs, per-expert GEMMs on contiguous row ranges, one scatter-add.
        Without autograd each expert's outputs are written in place into a single [P, D] buffer."""
        E = self.num_experts
        order = torch.argsort(expert_P, stable=True)
        token_sorted = token_P[order]
        counts = torch.bincount(expert_P, minlength=E).tolist()  # host sync: the row range of each expert
        w_sorted = None if weight_P is None else weight_P[order]
        x_PD = x_ND.index_select(0, token_sorted)  # [P, D], rows grouped by expert
        autograd = torch.is_grad_enabled() and (x_PD.requires_grad or self.down_proj.requires_grad
                                                 or w_sorted is not None and w_sorted.requires_grad)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # views taken once (see _loop)
        y_PD = None if autograd else torch.empty_like(x_PD)
        parts, start = [], 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = slice(start, start + n)
            start += n
            a = self._activations(F.linear(x_PD[rows], gate_up[e]))  # [n, I]
            if gram is not None:
                self._record_expert(e, a, gram)
            if w_sorted is not None:
                a = a * w_sorted[rows, None].to(a.dtype)
            if autograd:
                parts.append(F.linear(a, down[e]))  # [n, D]
            else:
                torch.mm(a, down[e].T, out=y_PD[rows])
        if autograd:
            y_PD = torch.cat(parts) if parts else x_PD.new_zeros(0, x_ND.shape[1])
        if out_ND is None:
            return torch.zeros_like(x_ND).index_add_(0, token_sorted, y_PD)
        # without autograd in place, as the loop path: the caller hands over its own buffer (the shared expert's output)
        return out_ND.index_add(0, token_sorted, y_PD) if autograd else out_ND.index_add_(0, token_sorted, y_PD)

    def _loop_one_token(self, x_1D, expert_P, weight_P, out_1D, gram):
        """Decode on CPU: the token's few experts read in place (no copies), their sum folded into addmm."""
        for i, e in enumerate(expert_P.tolist()):
            a = self._activations(F.linear(x_1D, self.gate_up_proj[e]))  # [1, I]
            if gram is not None:
                self._record_expert(e, a, gram)
            if weight_P is not None:
                a = a * weight_P[i].to(a.dtype)
            down = self.down_proj[e]  # [D, I]
            out_1D = F.linear(a, down) if out_1D is None else torch.addmm(out_1D, a, down.T)
        return out_1D

    def _dense_down(self, a_PI, token_P, expert_P, N: int, out_ND):
        """The down projection of all pairs as one GEMM over an [N, E·I] activation matrix, zeros where a token did not
        select an expert: more FLOPs than the selected experts need, but no [P, D] outputs to write and sum, which is
        what makes narrow experts slow."""
        E, inter = self.num_experts, self.down_proj.shape[-1]
        a_NF = a_PI.new_zeros(N * E, inter).index_copy(0, token_P * E + expert_P, a_PI).view(N, E * inter)
        if out_ND is None:
            return F.linear(a_NF, self._down_flat())
        return torch.addmm(out_ND, a_NF, self._down_flat().T)

    def _padded(self, x_ND, token_P, expert_P, weight_P, out_ND, gram):
        N, D = x_ND.shape
        E, inter = self.num_experts, self.down_proj.shape[-1]
        P = expert_P.numel()
        order = torch.argsort(expert_P, stable=True)
        expert_sorted, token_sorted = expert_P[order], token_P[order]
        counts = torch.bincount(expert_P, minlength=E)  # [E]
        C = int(counts.max())  # capacity: the busiest expert's tokens (host sync)
        starts = counts.cumsum(0) - counts
        slot = expert_sorted * C + torch.arange(P, device=x_ND.device) - starts[expert_sorted]  # [P] row in [E·C]
        token_slot = torch.full((E * C,), N, device=x_ND.device).index_copy_(0, slot, token_sorted)  # N: padding
        x_pad = torch.cat([x_ND, x_ND.new_zeros(1, D)])  # [N + 1, D], the last row zeros for padding slots
        x_ECD = x_pad.index_select(0, token_slot).view(E, C, D)
        a = self._activations(torch.bmm(x_ECD, self.gate_up_proj.transpose(1, 2)))  # [E, C, I], padding rows 0
        if gram is not None:
            with torch.no_grad():
                a32 = a.detach().float()
                self._record(_norms(a32, torch.bmm(a32, gram)).sum(1), counts)
        if weight_P is not None:
            w_slot = weight_P.new_zeros(E * C).index_copy(0, slot, weight_P[order])
            a = a * w_slot.view(E, C, 1).to(a.dtype)
        if torch.is_grad_enabled() and a.requires_grad and inter <= self.dense_down_max_inter:
            a_PI = a.view(E * C, inter).index_select(0, slot)
            return self._dense_down(a_PI, token_sorted, expert_sorted, N, out_ND)
        y = torch.bmm(a, self.down_proj.transpose(1, 2)).view(E * C, D)  # [E·C, D]
        if out_ND is None:
            out_ND = torch.zeros_like(x_ND)
        return out_ND.index_add(0, token_sorted, y.index_select(0, slot))

    def _grouped_mm(self, x_ND, token_P, expert_P, weight_P, out_ND, gram):
        E = self.num_experts
        order = torch.argsort(expert_P, stable=True)
        expert_sorted, token_sorted = expert_P[order], token_P[order]
        offs = torch.bincount(expert_P, minlength=E).cumsum(0).to(torch.int32)  # group ends, no host sync
        x_PD = x_ND.index_select(0, token_sorted)
        a = self._activations(torch._grouped_mm(x_PD, self.gate_up_proj.transpose(1, 2), offs=offs))  # [P, I]
        if gram is not None:
            with torch.no_grad():
                a32 = a.detach().float()
                norms = _norms(a32, torch._grouped_mm(a32, gram, offs=offs))
                self._record(torch.zeros(E, device=a.device).index_add_(0, expert_sorted, norms),
                             torch.bincount(expert_P, minlength=E))
        if weight_P is not None:
            a = a * weight_P[order][:, None].to(a.dtype)
        y = torch._grouped_mm(a, self.down_proj.transpose(1, 2), offs=offs)  # [P, D]
        if out_ND is None:
            out_ND = torch.zeros_like(x_ND)
        return out_ND.index_add(0, token_sorted, y)


def gaussian_logits(
    x_ND: torch.Tensor, mean_KD: torch.Tensor, log_std_KD: torch.Tensor, log_prior_K: torch.Tensor,
    log_beta: torch.Tensor,
) -> torch.Tensor:
    """[N, K] logits b_k + β·log N(x; μ_k, diag σ_k²) of K diagonal Gaussians (β = exp(log_beta), b = log_prior),
    expanded into two matmuls so that no [N, K, D] tensor is formed."""
    inv_var_KD = torch.exp(-2.0 * log_std_KD)
    quad_NK = (x_ND * x_ND) @ inv_var_KD.T - 2.0 * (x_ND @ (mean_KD * inv_var_KD).T) + (mean_KD.square() * inv_var_KD).sum(-1)
    log_norm_K = log_std_KD.sum(-1) + 0.5 * x_ND.shape[-1] * math.log(2 * math.pi)
    return log_prior_K + log_beta.exp() * (-0.5 * quad_NK - log_norm_K)


class TinyOnnRouter(DecodeKernelModule):
    """Flat (one scorer over E experts) or hierarchical (a main scorer over G groups, G sub-scorers) routing
    probabilities. A scorer is linear (logit = w·x), Gaussian (`router_score`; logit = b + β·log N(x; μ, diag σ²) per
    expert or group) or low-rank (flat only: logit = log Σ_j |act(ĝ_j)·û_j|·|c_j| over the expert's neurons, ĝ and û
    the gate and up pre-activations predicted by rank-`router_rank` factors) or gate (the same with the exact gate
    pre-activations, read from the experts' own gate rows after `bind_experts`, and û at rank `router_rank`, or
    û_j = 1 at rank 0). It reads the FFN input, or (`router_input`) a side input the model hands over before its layers
    run: the token embeddings or the running mean of the sequence's embeddings."""

    def __init__(self, config: TinyOnnConfig):
        super().__init__()
        E, D = config.num_experts, config.hidden_size
        self.num_experts = E
        self.hierarchical = config.router_type == "hierarchical"
        self.num_groups = config.num_expert_groups if self.hierarchical else 1
        self.gaussian = getattr(config, "router_score", "linear") == "gaussian"
        score = getattr(config, "router_score", "linear")
        self.lowrank = score in ACTIVATION_SCORES  # scores every routed neuron's (predicted) SwiGLU activation
        self.exact_gate = score == "gate"
        self.num_candidates = getattr(config, "router_candidates", 0)  # gate routers: experts ranked again exactly
        self._experts: list[nn.Module] = []  # gate routers: the block's experts, held outside the module tree
        self.input_kind = getattr(config, "router_input", "ffn")
        self.side_input: torch.Tensor | None = None  # [N, D], set by TinyOnnModel.forward when input_kind != "ffn"
        sizes = {"": E, "group_": self.num_groups} if self.hierarchical else {"": E}  # "": (sub-)routers, stacked
        if self.lowrank:  # predicted SwiGLU activations of every routed neuron (flat routers only: see the config)
            F_, r = E * config.moe_intermediate_size, config.router_rank
            self.act_fn = ACT2FN[config.hidden_act]
            if not self.exact_gate:
                self.gate_in = nn.Parameter(torch.empty(r, D))  # [r, D]
                self.gate_out = nn.Parameter(torch.empty(F_, r))  # [E·I, r]
            if r > 0:
                self.up_in = nn.Parameter(torch.empty(r, D))
                self.up_out = nn.Parameter(torch.empty(F_, r))
            self.neuron_scale = nn.Parameter(torch.empty(F_))  # [E·I], c_j: the norm of neuron j's down column at carve
            if self.num_candidates:  # [E·I], the second stage's weight of each neuron: ‖d_j‖ at carve
                self.down_norm = nn.Parameter(torch.empty(F_))
            return
        for prefix, K in sizes.items():
            if self.gaussian:
                setattr(self, prefix + "mean", nn.Parameter(torch.empty(K, D)))
                setattr(self, prefix + "log_std", nn.Parameter(torch.empty(K, D)))
                setattr(self, prefix + "log_prior", nn.Parameter(torch.empty(K)))
                setattr(self, prefix + "log_beta", nn.Parameter(torch.empty(1)))
            else:
                setattr(self, prefix + "weight", nn.Parameter(torch.empty(K, D)))

    def scores(self, r_ND: torch.Tensor, prefix: str = "", pre: GatePreactivations | None = None) -> torch.Tensor:
        """Raw logits [N, K] of the experts (prefix "") or of the groups (prefix "group_"), in float32 (`pre`: a gate
        router's pre-activations, when already computed by `preactivations`). A two-stage gate router gives the experts
        that are not a token's candidates a logit far below any candidate's, so that no selection reaches them."""
        if self.lowrank:
            if self.num_candidates and pre is None:
                pre = self.preactivations(r_ND)
            logits_NE = self.lowrank_scores(r_ND, pre).clamp_min(1e-12).log()
            if not self.num_candidates:
                return logits_NE
            outside_NE = torch.ones_like(logits_NE, dtype=torch.bool).scatter_(1, pre.candidates_NM, False)
            return logits_NE.masked_fill(outside_NE, NON_CANDIDATE_LOGIT)
        if not self.gaussian:
            return F.linear(r_ND, getattr(self, prefix + "weight").float())
        params = (getattr(self, prefix + name).float() for name in ("mean", "log_std", "log_prior", "log_beta"))
        return gaussian_logits(r_ND, *params)

    def bind_experts(self, experts: nn.Module) -> None:
        """Give a "gate" router the experts whose gate rows it reads (kept out of the module tree: no second copy of
        the weights in the state dict)."""
        self._experts = [experts]

    def _expert_rows(self, half: int) -> torch.Tensor:
        if not self._experts:
            raise RuntimeError("a 'gate' router reads its experts' gate rows: call bind_experts first")
        w = self._experts[0].gate_up_proj  # [E, 2I, D]
        E, I2, D = w.shape
        inter = I2 // 2
        return w[:, half * inter : (half + 1) * inter].reshape(E * inter, D)  # [E·I, D]

    def gate_rows(self) -> torch.Tensor:
        """The routed neurons' gate projection rows [E·I, D]: the experts' own for a "gate" router, else the rank-r
        estimate B_g A_g."""
        return self._expert_rows(0) if self.exact_gate else self.gate_out @ self.gate_in

    def _decode_preactivations(self, x32_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode on CPU: every routed neuron's gate (and, two stages, up) pre-activation [N, E·I] from one call of
        the decode kernel on a cached float32 copy of the experts' gate (and up) rows, transposed [D, E·I (·2)]."""
        w = self._experts[0].gate_up_proj

        def build() -> tuple[torch.Tensor, ...]:
            rows = [self._expert_rows(0)] + ([self._expert_rows(1)] if self.num_candidates else [])
            return torch.cat(rows).float().T, torch.arange(w.shape[-1], device=w.device)  # [D, F or 2F], [D]

        table_DC, rows_D = self.decode_tables.get((w,), build)
        N, D = x32_ND.shape
        h_NC = bag_products(rows_D.expand(N, D), table_DC, x32_ND.contiguous())
        F_ = h_NC.shape[1] // (2 if self.num_candidates else 1)
        return h_NC[:, :F_], (h_NC[:, F_:] if self.num_candidates else None)

    def reads_decode_kernel(self, x_ND: torch.Tensor) -> bool:
        """Whether `preactivations` reads every gate (and up) row through the decode kernel for these tokens."""
        return bool(self._experts and x_ND.shape[0] <= self.bag_max_tokens
                    and bag_kernel_applies(x_ND, self._experts[0].gate_up_proj, dtype=False))

    def preactivations(self, x_ND: torch.Tensor) -> GatePreactivations:
        """A "gate" router's exact gate pre-activations of every routed neuron, and (two stages) each token's candidates
        — its `router_candidates` experts of largest estimated score — with their neurons' exact up pre-activations,
        float32. The MoE block computes them once and hands them to the experts too, so no projection runs twice. The
        candidates' up rows are gathered when the tokens' candidates are fewer than the experts, else every neuron's up
        comes from one GEMM and the others are zeroed. CPU decode without autograd (up to `bag_max_tokens` tokens) reads
        every gate (and up) row through the decode kernel instead: one call, faster than the GEMV."""
        x32 = x_ND.float()
        N = x_ND.shape[0]
        up_all = None  # every neuron's up pre-activation, from the decode kernel
        if self.reads_decode_kernel(x_ND):
            gate_NF, up_all = self._decode_preactivations(x32)
            pre = GatePreactivations(gate_NF)
        else:
            pre = GatePreactivations(F.linear(x32, self.gate_rows().float()))
        if not self.num_candidates:
            return pre
        E, M = self.num_experts, self.num_candidates
        with torch.no_grad():
            pre.candidates_NM = self.estimated_scores(x32, pre.gate_NF).topk(M, dim=-1, sorted=False).indices
        if up_all is not None:
            inter = up_all.shape[1] // E
            keep_NE = torch.zeros(N, E, device=x_ND.device).scatter_(1, pre.candidates_NM, 1.0)
            pre.up_NF = (up_all.reshape(N, E, inter) * keep_NE[:, :, None]).view(N, E * inter)
            return pre
        up_rows = self._expert_rows(1).float()  # [E·I, D]
        inter = up_rows.shape[0] // E
        if N * M >= E:
            keep_NE = torch.zeros(N, E, device=x_ND.device).scatter_(1, pre.candidates_NM, 1.0)
            pre.up_NF = (F.linear(x32, up_rows).view(N, E, inter) * keep_NE[:, :, None]).view(N, E * inter)
        else:
            rows = up_rows.view(E, inter, -1).index_select(0, pre.candidates_NM.reshape(-1))  # [N·M, I, D]
            up_NMI = torch.bmm(rows.view(N, M * inter, -1), x32[:, :, None]).view(N, M, inter)
            cand_NMI = pre.candidates_NM[:, :, None].expand(N, M, inter)
            pre.up_NF = up_NMI.new_zeros(N, E, inter).scatter(1, cand_NMI, up_NMI).view(N, E * inter)
        return pre

    def estimated_scores(self, x_ND: torch.Tensor, gate_NF: torch.Tensor | None = None,
                         act_gate_NF: torch.Tensor | None = None) -> torch.Tensor:
        """The activation scorers' estimated expert scores [N, E] = Σ_j |ĥ_j|·|c_j| over each expert's neurons, in
        float32 (`gate_NF`: a gate router's exact gate pre-activations, when already computed; `act_gate_NF`: their
        activations act(gate_NF), when already computed): a one-stage router's scores, a two-stage router's first
        stage."""
        if act_gate_NF is not None:
            h_NF = act_gate_NF
        else:
            if self.exact_gate:
                g_NF = F.linear(x_ND.float(), self.gate_rows().float()) if gate_NF is None else gate_NF
            else:
                g_NF = F.linear(F.linear(x_ND, self.gate_in.float()), self.gate_out.float())
            h_NF = self.act_fn(g_NF)
        if hasattr(self, "up_in"):
            h_NF = h_NF * F.linear(F.linear(x_ND, self.up_in.float()), self.up_out.float())
        return self._per_expert(h_NF.abs() * self.neuron_scale.float().abs())

    def _per_expert(self, s_NF: torch.Tensor) -> torch.Tensor:
        if s_NF.shape[1] == self.num_experts:  # one neuron per expert: nothing to sum
            return s_NF
        return s_NF.view(s_NF.shape[0], self.num_experts, -1).sum(-1)  # [N, E]

    def lowrank_scores(self, x_ND: torch.Tensor, pre: GatePreactivations | None = None) -> torch.Tensor:
        """The activation scorers' expert scores [N, E] in float32: `estimated_scores`, or for a two-stage gate router
        the exact Σ_j |act(x·g_j)·(x·u_j)|·|‖d_j‖| of each token's candidates (0 for the other experts). `pre`: a gate
        router's `preactivations`, when already computed."""
        if self.exact_gate and pre is None:
            pre = self.preactivations(x_ND)
        if not self.num_candidates:
            return self.estimated_scores(x_ND, None if pre is None else pre.gate_NF)
        h_NF = self.act_fn(pre.gate_NF) * pre.up_NF
        return self._per_expert(h_NF.abs() * self.down_norm.float().abs())

    def expert_directions(self) -> torch.Tensor:
        """One vector per expert [E, D] in the router's input space, for plots: a linear router's weight rows, a
        Gaussian router's means, an activation scorer's mean (predicted) gate row over the expert's neurons."""
        if self.lowrank:
            rows = self.gate_rows()  # [E·I, D]
            return rows.reshape(self.num_experts, -1, rows.shape[-1]).mean(1)
        return self.mean if self.gaussian else self.weight

    def routing_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        """What the router scores: the FFN input x_ND, or the side input set by the model for this forward."""
        if self.input_kind == "ffn":
            return x_ND
        if self.side_input is None or self.side_input.shape[0] != x_ND.shape[0]:
            raise RuntimeError(f"router_input={self.input_kind!r}: the model did not set this forward's side input")
        return self.side_input

    def route(self, r_ND: torch.Tensor, pre: GatePreactivations | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(log-probabilities [N, E], the raw logits of each softmax) for routing inputs r_ND (`pre`: see `scores`)."""
        r = r_ND.float()
        logits_NE = self.scores(r, pre=pre)
        if not self.hierarchical:
            return F.log_softmax(logits_NE, dim=-1), [logits_NE]
        N, G = logits_NE.shape[0], self.num_groups
        sub_NGe = logits_NE.view(N, G, -1)
        logp_sub_NGe = F.log_softmax(sub_NGe, dim=-1)  # p(expert | group)
        main_NG = self.scores(r, "group_")
        logp_NE = (F.log_softmax(main_NG, dim=-1)[:, :, None] + logp_sub_NGe).reshape(N, -1)
        return logp_NE, [main_NG, sub_NGe]

    def log_probs(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, E] in float32."""
        return self.log_probs_and_z_loss(x_ND, z_loss=False)[0]

    def log_probs_and_z_loss(
        self, x_ND: torch.Tensor, z_loss: bool = True, pre: GatePreactivations | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities [N, E] in float32 and (when `z_loss`) the mean squared log-sum-exp of the raw router
        logits (ST-MoE's z-loss; for a hierarchical router the mean over the main router and the sub-routers).
        `pre`: see `scores`."""
        logp_NE, z_terms = self.route(self.routing_input(x_ND), pre)
        z = sum(torch.logsumexp(t, dim=-1).pow(2).mean() for t in z_terms) / len(z_terms) if z_loss else None
        return logp_NE, z

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log-probabilities, probabilities), both [N, E], computed in float32."""
        logp_NE = self.log_probs(x_ND)
        return logp_NE, logp_NE.exp()


def expert_indices(
    scores_NE: torch.Tensor, top_k: int, top_p: float = 0.0, min_k: int = 1, max_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token's selected experts [N, K] (top-k: in no particular order; top-p: best first) and (top_p > 0) which of
    them are kept [N, K] (else None).

    Top-k ranks `scores_NE` (probabilities or log-probabilities); top-p (`scores_NE` must be probabilities) keeps the
    fewest experts reaching cumulative probability top_p, clamped to [min_k, max_k]; K is then the batch's largest k
    (a host sync)."""
    if top_p <= 0.0:
        return scores_NE.topk(top_k, dim=-1, sorted=False).indices, None  # a set: unsorted is 1.5-3x faster
    E = scores_NE.shape[-1]
    sorted_NE, order_NE = scores_NE.sort(dim=-1, descending=True)
    before_NE = sorted_NE.cumsum(dim=-1) - sorted_NE  # mass of the better-ranked experts
    k_N = (before_NE < top_p).sum(dim=-1).clamp(min_k, max_k or E)
    K = int(k_N.max())
    keep_NK = torch.arange(K, device=scores_NE.device)[None, :] < k_N[:, None]
    return order_NE[:, :K], keep_NK


def router_side_input(
    embeds_BTD: torch.Tensor, attention_mask: torch.Tensor | None, kind: str, cache: Cache | None = None
) -> torch.Tensor:
    """The routers' input [B*T, D] when it is not the FFN input: the input embeddings ("embedding"), or ("context") the
    mean of the sequence's embeddings up to and including each position, padding excluded. With a KV cache the running
    sum and count are kept on the cache object, so cached decoding sees the same context as a full forward."""
    B, T, D = embeds_BTD.shape
    if kind == "embedding":
        return embeds_BTD.reshape(-1, D)
    keep_BT = torch.ones(B, T, device=embeds_BTD.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        keep_BT = attention_mask[:, -T:].to(embeds_BTD.device, torch.float32)
    sum_BTD = (embeds_BTD.float() * keep_BT[..., None]).cumsum(1)
    count_BT = keep_BT.cumsum(1)
    if cache is not None:
        prev_sum_BD, prev_count_B = getattr(cache, "tiny_onn_context", (None, None))
        if prev_sum_BD is not None and prev_sum_BD.shape[0] == B:
            sum_BTD = sum_BTD + prev_sum_BD[:, None]
            count_BT = count_BT + prev_count_B[:, None]
        cache.tiny_onn_context = (sum_BTD[:, -1].detach(), count_BT[:, -1])
    return (sum_BTD / count_BT.clamp_min(1.0)[..., None]).to(embeds_BTD.dtype).reshape(-1, D)


def select_experts(
    probs_NE: torch.Tensor, top_k: int, top_p: float = 0.0, min_k: int = 1, max_k: int | None = None
) -> torch.Tensor:
    """Boolean [N, E] selection: the top-k experts, or (top_p > 0) the fewest reaching cumulative probability top_p."""
    idx_NK, keep_NK = expert_indices(probs_NE, top_k, top_p, min_k, max_k)
    return torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(1, idx_NK, True if keep_NK is None else keep_NK)


class TinyOnnSparseMoeBlock(nn.Module):
    """Router -> selection -> experts (+ the always-on shared expert). Selected outputs are summed."""

    two_stage_fast_path = True  # `_two_stage_selection` where it applies (an instance may turn it off, to compare)

    def __init__(self, config: TinyOnnConfig):
        super().__init__()
        self.config = config
        self.router = TinyOnnRouter(config)
        self.experts = TinyOnnExperts(config)
        self.shared_expert = (
            TinyOnnMLP(config, config.shared_expert_intermediate_size) if config.shared_expert_intermediate_size else None
        )
        # the mean output of the neurons a token does not run (fitted by the carve; see TinyOnnConfig.moe_output_bias)
        self.output_bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.moe_output_bias else None
        self.routing = RoutingSettings.from_config(config).checked(config.num_experts)
        if self.router.exact_gate:
            self.router.bind_experts(self.experts)

    def route(self, logp_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Selected experts [N, K], their weights [N, K] (None: exactly 1, no gradient wanted) and, for top-p, which
        of the K are kept [N, K] (else None)."""
        cfg, routing = self.config, self.routing
        N, E = logp_NE.shape
        if routing.mode == "dense_mixture":  # training phase 1: every expert, weights E·p
            idx_NE = torch.arange(E, device=logp_NE.device).expand(N, E)
            return idx_NE, logp_NE.exp() * E, None  # scaled so that uniform routing equals the dense FFN
        wants_probs = routing.top_p > 0 or cfg.expert_weighting != "straight_through" or logp_NE.requires_grad
        probs_NE = logp_NE.exp() if wants_probs else None
        with torch.no_grad():
            scores = probs_NE if routing.top_p > 0 else logp_NE
            idx_NK, keep_NK = expert_indices(
                scores, routing.top_k, routing.top_p, cfg.min_experts_per_tok, cfg.max_experts_per_tok
            )
        if cfg.expert_weighting != "straight_through":
            return idx_NK, probs_NE.gather(1, idx_NK), keep_NK
        if logp_NE.requires_grad:
            p_NK = probs_NE.gather(1, idx_NK)
            # exactly 1 in value (the router selects, it does not rescale), d/dp = 1 so the router learns
            return idx_NK, (p_NK - p_NK.detach()) + 1.0, keep_NK
        return idx_NK, None, keep_NK  # weight 1 and no gradient wanted: skip the multiply

    def ranks_raw_scores(self) -> bool:
        """Whether the selection can be read off the router's raw scores alone: a flat router's top-k with weight 1 and
        no gradient wanted (the softmax is monotonic, so the top-k of the scores is the top-k of the probabilities)."""
        routing = self.routing
        return (routing.mode == "sparse" and routing.top_p <= 0.0 and not self.router.hierarchical
                and self.config.expert_weighting == "straight_through" and not torch.is_grad_enabled())

    def forward(
        self, hidden_states: torch.Tensor, routing_outputs: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Return (output [B, T, D], router log-probabilities [N, E], selection [N, E], router z-loss (training mode
        only, else None)). `routing_outputs=False`: the caller reads only the output (generation, perplexity); where
        `ranks_raw_scores`, the block then skips the router's softmax and the [N, E] selection and returns None for
        both — a decode step's MoE block is a handful of small operations, so each one saved counts."""
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        if not routing_outputs and self.runs_two_stage_selection(x_ND):
            return self._with_bias(self._two_stage_selection(x_ND)).reshape(shape), None, None, None
        # a gate router reads the experts' own pre-activations: computed once here, for the router and the experts
        pre = self.router.preactivations(x_ND) if self.router.exact_gate else None
        if not routing_outputs and self.ranks_raw_scores():
            scores_NE = self.router.scores(self.router.routing_input(x_ND).float(), pre=pre)
            idx_NK = scores_NE.topk(self.routing.top_k, dim=-1, sorted=False).indices
            out_ND = self.experts(x_ND, idx_NK, pre=pre, shared=self.shared_expert)
            return self._with_bias(out_ND).reshape(shape), None, None, None
        logp_NE, z_loss = self.router.log_probs_and_z_loss(x_ND, z_loss=self.training, pre=pre)
        idx_NK, weight_NK, keep_NK = self.route(logp_NE)
        with torch.no_grad():
            selected_NE = torch.zeros(logp_NE.shape, dtype=torch.bool, device=logp_NE.device)
            selected_NE.scatter_(1, idx_NK, True if keep_NK is None else keep_NK)
        out_ND = self.experts(x_ND, idx_NK, weight_NK, keep_NK, pre=pre, shared=self.shared_expert)
        return self._with_bias(out_ND).reshape(shape), logp_NE, selected_NE, z_loss

    def runs_two_stage_selection(self, x_ND: torch.Tensor) -> bool:
        """Whether a call whose caller reads only the output runs `_two_stage_selection`: a two-stage gate router over
        one-neuron experts, selected by their raw scores (`ranks_raw_scores`), on the automatic dispatch path, without
        statistics, and with every neuron's up pre-activation computed anyway (the decode kernel reads them all, and
        once the tokens' candidates outnumber the experts so does the GEMM)."""
        router, experts = self.router, self.experts
        if not (self.two_stage_fast_path and router.num_candidates and experts.down_proj.shape[-1] == 1
                and experts.path == "auto"
                and not experts.track_stats and self.ranks_raw_scores()):
            return False
        return x_ND.shape[0] * router.num_candidates >= router.num_experts or router.reads_decode_kernel(x_ND)

    def _two_stage_selection(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The block's output (before the output bias) for a two-stage gate router over one-neuron experts, as the
        general path computes it, in fewer passes over [tokens, neurons] tensors: each neuron's activation
        act(x·g)·(x·u) is formed once and serves the exact scores and the experts (no masked copy of the up
        pre-activations, no second pass through the experts' dispatch). Its output equals the general path's bit for
        bit (tests/model/test_routers.py)."""
        router, experts = self.router, self.experts
        N, D = x_ND.shape
        x32 = x_ND.float()
        if router.reads_decode_kernel(x_ND):
            g_NF, u_NF = router._decode_preactivations(x32)
        else:
            g_NF, u_NF = F.linear(x32, router.gate_rows().float()), F.linear(x32, router._expert_rows(1).float())
        act_NF = router.act_fn(g_NF)  # one neuron per expert: F = E
        with torch.no_grad():
            est_NE = router.estimated_scores(x32, g_NF, act_gate_NF=act_NF)
            cand_NM = est_NE.topk(router.num_candidates, dim=-1, sorted=False).indices
        # the general path's log-scores, ranked over all experts as it ranks them: scores below 1e-12 tie there, and
        # ranking the candidates alone would break those ties otherwise (a different neuron of ~0 output, which can
        # still flip a near-tie of a later layer); the same tensor gives the same selection, in the same order. Only
        # the candidates' activations are formed: the others' logits are the constant the general path gives them.
        h_NM = act_NF.gather(1, cand_NM) * u_NF.gather(1, cand_NM)  # [N, M] the candidates' SwiGLU activations
        exact_NM = h_NM.abs() * router.down_norm.float().abs()[cand_NM]
        logits_NE = torch.full_like(g_NF, NON_CANDIDATE_LOGIT).scatter_(1, cand_NM, exact_NM.clamp_min(1e-12).log())
        idx_NK = logits_NE.topk(self.routing.top_k, dim=-1, sorted=False).indices
        a_NK = (act_NF.gather(1, idx_NK) * u_NF.gather(1, idx_NK)).to(x_ND.dtype)
        E = router.num_experts
        # the sums in the general path's order (the shared expert's output first, accumulated into by the GEMM), so
        # that both paths agree bit for bit: a last-bit difference can flip a near-tie of a later layer's top-k
        shared_ND = None if self.shared_expert is None else self.shared_expert(x_ND)
        if N == 1:  # decode: a weighted sum of the selected down columns, read in place
            y_ND = F.embedding_bag(idx_NK, experts.down_proj.reshape(E, D), per_sample_weights=a_NK, mode="sum")
            return y_ND if shared_ND is None else shared_ND + y_ND
        a_NF = torch.zeros_like(g_NF, dtype=x_ND.dtype).scatter_(1, idx_NK, a_NK)  # selected activations, 0 elsewhere
        if shared_ND is None:
            return F.linear(a_NF, experts._down_flat())
        return torch.addmm(shared_ND, a_NF, experts._down_flat().T)

    def _with_bias(self, out_ND: torch.Tensor) -> torch.Tensor:
        """The experts' summed output plus the block's output bias, when it has one."""
        return out_ND if self.output_bias is None else out_ND + self.output_bias.to(out_ND.dtype)


class TinyOnnDecoderLayer(nn.Module):
    def __init__(self, config: TinyOnnConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TinyOnnAttention(config, layer_idx)
        self.mlp = TinyOnnSparseMoeBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing_outputs: bool = True,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        moe_out, logp_NE, selected_NE, z_loss = self.mlp(self.post_attention_layernorm(hidden_states),
                                                             routing_outputs=routing_outputs)
        return hidden_states + moe_out, logp_NE, selected_NE, z_loss


class TinyOnnPreTrainedModel(PreTrainedModel):
    config_class = TinyOnnConfig
    config: TinyOnnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TinyOnnDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, TinyOnnExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, TinyOnnSparseMoeBlock) and module.output_bias is not None:
            module.output_bias.zero_()
        elif isinstance(module, TinyOnnRouter) and module.lowrank:
            for name in ("gate_in", "gate_out", "up_in", "up_out"):
                if hasattr(module, name):
                    getattr(module, name).normal_(0.0, std)
            module.neuron_scale.fill_(1.0)
            if module.num_candidates:
                module.down_norm.fill_(1.0)
        elif isinstance(module, TinyOnnRouter):
            prefixes = ("", "group_") if module.hierarchical else ("",)
            for prefix in prefixes:
                if module.gaussian:  # unit Gaussians around random means, β = 1/D: mild preferences
                    getattr(module, prefix + "mean").normal_(0.0, 1.0)
                    getattr(module, prefix + "log_std").zero_()
                    getattr(module, prefix + "log_prior").zero_()
                    getattr(module, prefix + "log_beta").fill_(-math.log(module.mean.shape[-1]))
                else:
                    getattr(module, prefix + "weight").normal_(0.0, std)


class TinyOnnModel(TinyOnnPreTrainedModel):
    def __init__(self, config: TinyOnnConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TinyOnnDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> TinyOnnModelOutput:
        """`output_router_logits=False`: the caller reads only the hidden states, so `router_logits` and
        `expert_selections` may be None (see `TinyOnnSparseMoeBlock.forward`); None (the default) or True: both kept."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_key_values = cache if cache is not None else past_key_values  # newer generate() passes `cache`
        routing_outputs = output_router_logits is not False
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        # a Mistral-style source attends within the same window in every layer (DynamicCache keeps only that window too)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: past_key_values},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        router_input = getattr(self.config, "router_input", "ffn")
        if router_input != "ffn":  # the routers read a side input instead of their FFN input
            side_ND = router_side_input(inputs_embeds, attention_mask, router_input, past_key_values)
            for layer in self.layers:
                layer.mlp.router.side_input = side_ND
        router_logits, selections, z_losses = [], [], []
        for layer in self.layers:
            hidden_states, logp_NE, selected_NE, z_loss = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                routing_outputs=routing_outputs,
                **kwargs,
            )
            router_logits.append(logp_NE)
            selections.append(selected_NE)
            z_losses.append(z_loss)
        skipped = any(lp is None for lp in router_logits)  # the blocks skipped them (routing_outputs=False)
        return TinyOnnModelOutput(
            last_hidden_state=self.norm(hidden_states),
            router_logits=None if skipped else tuple(router_logits),
            expert_selections=None if skipped else tuple(selections),  # [N, E] booleans per layer
            router_z_loss=torch.stack(z_losses).mean() if self.training else None,
            **{_OUTPUT_CACHE_FIELD: past_key_values},
        )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], selections: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch Transformer load balance, E * sum_e f_e * P_e averaged over layers (f: share of selections, P: mean prob)."""
    losses = []
    for logp_NE, sel_NE in zip(router_logits, selections, strict=True):
        E = logp_NE.shape[-1]
        w_N = torch.ones(logp_NE.shape[0], device=logp_NE.device)
        if attention_mask is not None and attention_mask.numel() == w_N.numel():
            w_N = attention_mask.reshape(-1).to(logp_NE.device, torch.float32)
        sel = sel_NE.float() * w_N[:, None]
        f_E = sel.sum(0) / sel.sum().clamp_min(1.0)
        P_E = (logp_NE.exp() * w_N[:, None]).sum(0) / w_N.sum().clamp_min(1.0)
        losses.append(E * (f_E * P_E).sum())
    return torch.stack(losses).mean()


class TinyOnnForCausalLM(TinyOnnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyOnnConfig):
        super().__init__(config)
        self.model = TinyOnnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> list[TinyOnnSparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_routing(self, **changes) -> RoutingSettings:
        """Change how every MoE block routes from now on (`mode`, `top_k`, `top_p`; see `RoutingSettings`) without
        touching the config: the saved model keeps the routing it was carved or trained with. Returns the settings
        before the change."""
        blocks = self.moe_blocks()
        before = blocks[0].routing
        new = dataclasses.replace(before, **changes).checked(self.config.num_experts)
        for block in blocks:
            block.routing = new
        return before

    @contextlib.contextmanager
    def routing_settings(self, **changes):
        """`set_routing(**changes)` inside the block, the previous settings restored afterwards."""
        before = self.set_routing(**changes)
        try:
            yield self.moe_blocks()[0].routing
        finally:
            for block in self.moe_blocks():
                block.routing = before

    def track_expert_stats(self, on: bool = True) -> None:
        """Accumulate each expert's routed-output norm and token count (SMK², `TinyOnnExperts.output_norm_sum` and
        `routed_count`) in every forward from now on (on) or stop (off)."""
        for block in self.moe_blocks():
            block.experts.track_stats = on

    def use_decode_kernel(self, on: bool = True) -> None:
        """Turn the CPU decode kernel (`bag_products` over cached transposed weights: the experts' "bag" path, the gate
        routers' and shared experts' one-token products) on with the default token limits, or off, which also frees
        its cached copies (they double the FFN weights' memory while they exist)."""
        for module in self.modules():
            if not isinstance(module, DecodeKernelModule):
                continue
            if on:
                vars(module).pop("bag_max_tokens", None)  # back to the class default
            else:
                module.bag_max_tokens = 0
                module.decode_tables.clear()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> TinyOnnCausalLMOutput:
        past_key_values = cache if cache is not None else past_key_values  # newer generate() passes `cache`
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, outputs.expert_selections, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return TinyOnnCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            router_logits=outputs.router_logits if output_router_logits else None,
            router_z_loss=outputs.router_z_loss,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )


__all__ = ["RoutingSettings", "TinyOnnForCausalLM", "TinyOnnModel", "TinyOnnPreTrainedModel", "expert_indices",
           "select_experts"]
