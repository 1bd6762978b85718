"""TinyOnn: a decoder LLM whose FFNs are Mixtures of Experts carved out of a dense SwiGLU model.

Organised like transformers' qwen3_moe: Router -> SparseMoeBlock (dispatch/combine) -> Experts, inside DecoderLayer,
Model and ForCausalLM. Imports only torch and transformers, so exported folders load with `trust_remote_code=True`.

Legend: N tokens (batch * sequence flattened), D hidden size, E routed experts, G expert groups, I neurons per expert,
P selected (token, expert) pairs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
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
    from .configuration_tiny_onn import TinyOnnConfig
except ImportError:  # pragma: no cover - loaded as a flat module
    from configuration_tiny_onn import TinyOnnConfig


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
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class TinyOnnMLP(nn.Module):
    """A dense SwiGLU FFN (the always-on shared expert)."""

    def __init__(self, config: TinyOnnConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TinyOnnExperts(nn.Module):
    """E equal-size SwiGLU experts stored as fused 3-D tensors; tokens are grouped by expert, one matmul pair per expert."""

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

    def forward(
        self,
        x_ND: torch.Tensor,
        token_P: torch.Tensor,
        expert_P: torch.Tensor,
        weight_P: torch.Tensor | None,
        out_ND: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of the selected experts' outputs per token, each scaled by `weight_P` (None: weight 1), added to `out_ND`
        in place when given (the shared expert's output: saves a zero-filled buffer and a sum)."""
        order = torch.argsort(expert_P, stable=True)
        token_P = token_P[order]
        counts = torch.bincount(expert_P, minlength=self.num_experts).tolist()
        x_PD = x_ND.index_select(0, token_P)  # tokens grouped by expert
        ends = list(accumulate(counts))
        bounds = [(e, ends[e] - n, ends[e]) for e, n in enumerate(counts) if n]  # expert e owns rows [start, end)
        if torch.is_grad_enabled() and (x_ND.requires_grad or self.down_proj.requires_grad):
            y_PD = torch.cat([self.expert_forward(e, x_PD[a:b]) for e, a, b in bounds])
        else:  # inference: write each expert's rows in place, no concatenation copy
            y_PD = torch.empty_like(x_PD)
            inter = self.down_proj.shape[-1]
            for e, a, b in bounds:
                h = torch.mm(x_PD[a:b], self.gate_up_proj[e].T)
                torch.mm(self.act_fn(h[:, :inter]) * h[:, inter:], self.down_proj[e].T, out=y_PD[a:b])
        if self.track_stats:
            if self.output_norm_sum is None:
                self.reset_stats()
            with torch.no_grad():
                expert_sorted = expert_P[order]
                self.output_norm_sum.index_add_(0, expert_sorted, y_PD.detach().float().norm(dim=-1))
                self.routed_count += torch.bincount(expert_sorted, minlength=self.num_experts).float()
        if weight_P is not None:
            y_PD = y_PD * weight_P[order][:, None].to(y_PD.dtype)
        if out_ND is None:
            out_ND = torch.zeros_like(x_ND)
        return out_ND.index_add_(0, token_P, y_PD)


class TinyOnnRouter(nn.Module):
    """Flat (one linear over E experts) or hierarchical (a main router over G groups, G sub-routers) routing probabilities."""

    def __init__(self, config: TinyOnnConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hierarchical = config.router_type == "hierarchical"
        self.num_groups = config.num_expert_groups if self.hierarchical else 1
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # sub-routers, stacked
        if self.hierarchical:
            self.group_weight = nn.Parameter(torch.empty(self.num_groups, config.hidden_size))  # the main router

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log-probabilities, probabilities), both [N, E], computed in float32.

        In training mode also sets `self.z_loss`, the mean squared log-sum-exp of the raw router logits (ST-MoE).
        """
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        if not self.hierarchical:
            logp_NE = F.log_softmax(logits_NE, dim=-1)
            z_terms = [logits_NE]
        else:
            N, G = logits_NE.shape[0], self.num_groups
            sub_NGe = logits_NE.view(N, G, -1)
            logp_sub_NGe = F.log_softmax(sub_NGe, dim=-1)  # p(expert | group)
            main_NG = F.linear(x_ND.float(), self.group_weight.float())
            logp_NE = (F.log_softmax(main_NG, dim=-1)[:, :, None] + logp_sub_NGe).reshape(N, -1)
            z_terms = [main_NG, sub_NGe]
        if self.training:
            self.z_loss = sum(torch.logsumexp(z, dim=-1).pow(2).mean() for z in z_terms) / len(z_terms)
        return logp_NE, logp_NE.exp()


def select_experts(
    probs_NE: torch.Tensor, top_k: int, top_p: float = 0.0, min_k: int = 1, max_k: int | None = None
) -> torch.Tensor:
    """Boolean [N, E] selection: the top-k experts, or (top_p > 0) the fewest reaching cumulative probability top_p."""
    N, E = probs_NE.shape
    if top_p <= 0.0:
        idx_Nk = probs_NE.topk(top_k, dim=-1).indices
        return torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(1, idx_Nk, True)
    sorted_NE, order_NE = probs_NE.sort(dim=-1, descending=True)
    before_NE = sorted_NE.cumsum(dim=-1) - sorted_NE  # mass of the better-ranked experts
    k_N = (before_NE < top_p).sum(dim=-1).clamp(min_k, max_k or E)
    keep_NE = torch.arange(E, device=probs_NE.device)[None, :] < k_N[:, None]
    return torch.zeros_like(keep_NE).scatter_(1, order_NE, keep_NE)


class TinyOnnSparseMoeBlock(nn.Module):
    """Router -> selection -> experts (+ the always-on shared expert). Selected outputs are summed."""

    def __init__(self, config: TinyOnnConfig):
        super().__init__()
        self.config = config
        self.router = TinyOnnRouter(config)
        self.experts = TinyOnnExperts(config)
        self.shared_expert = (
            TinyOnnMLP(config, config.shared_expert_intermediate_size) if config.shared_expert_intermediate_size else None
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (output [B, T, D], router log-probabilities [N, E], selection [N, E])."""
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        logp_NE, probs_NE = self.router(x_ND)
        cfg = self.config
        dense_mixture = getattr(cfg, "moe_mode", "sparse") == "dense_mixture"
        with torch.no_grad():
            if dense_mixture:  # training phase 1: every expert computes and receives gradients
                selected_NE = torch.ones_like(probs_NE, dtype=torch.bool)
            else:
                selected_NE = select_experts(
                    probs_NE, cfg.num_experts_per_tok, cfg.router_top_p, cfg.min_experts_per_tok, cfg.max_experts_per_tok
                )
        token_P, expert_P = selected_NE.nonzero(as_tuple=True)
        p_P = probs_NE[token_P, expert_P]
        if dense_mixture:
            weight_P = p_P * probs_NE.shape[-1]  # softmax mixture scaled so uniform routing equals the dense FFN
        elif cfg.expert_weighting != "straight_through":
            weight_P = p_P
        elif p_P.requires_grad:
            # exactly 1 in value (the router selects, it does not rescale), d/dp = 1 so the router learns
            weight_P = (p_P - p_P.detach()) + 1.0
        else:
            weight_P = None  # weight 1 and no gradient wanted: skip the multiply
        shared_ND = self.shared_expert(x_ND) if self.shared_expert is not None else None
        out_ND = self.experts(x_ND, token_P, expert_P, weight_P, out_ND=shared_ND)
        return out_ND.reshape(shape), logp_NE, selected_NE


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
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        moe_out, logp_NE, selected_NE = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + moe_out, logp_NE, selected_NE


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
        elif isinstance(module, TinyOnnRouter):
            module.weight.normal_(0.0, std)
            if module.hierarchical:
                module.group_weight.normal_(0.0, std)


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
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_key_values = cache if cache is not None else past_key_values  # newer generate() passes `cache`
        kwargs.pop("output_router_logits", None)
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
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: past_key_values},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        router_logits, selections = [], []
        for layer in self.layers:
            hidden_states, logp_NE, selected_NE = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            router_logits.append(logp_NE)
            selections.append(selected_NE)
        out = MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            router_logits=tuple(router_logits),
            **{_OUTPUT_CACHE_FIELD: past_key_values},
        )
        out.expert_selections = tuple(selections)  # [N, E] booleans per layer, for load balance and analysis
        return out


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
    ) -> MoeCausalLMOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # newer generate() passes `cache`
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
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
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            router_logits=outputs.router_logits if output_router_logits else None,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )


__all__ = ["TinyOnnForCausalLM", "TinyOnnModel", "TinyOnnPreTrainedModel", "select_experts"]
