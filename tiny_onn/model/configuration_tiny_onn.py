"""TinyOnn configuration: a Llama/Qwen3-style decoder whose FFNs are Mixtures of Experts carved from a dense source.

This file imports only transformers, so that it is copied into every exported model folder and loads there with
`trust_remote_code=True` on a machine without tiny_onn.
"""

from transformers import PretrainedConfig

ROUTER_TYPES = ("flat", "hierarchical")
EXPERT_WEIGHTINGS = ("straight_through", "probs")
ROUTER_SCORES = ("linear", "gaussian", "lowrank", "gate")
ACTIVATION_SCORES = ("lowrank", "gate")  # score the routed neurons' SwiGLU activations: flat routers on the FFN input
ROUTER_INPUTS = ("ffn", "embedding", "context")


class TinyOnnConfig(PretrainedConfig):
    r"""
    Attention, embeddings and norms follow the dense source (Llama, or Qwen3 with `use_qk_norm=True`; Qwen2's biased
    q/k/v with an unbiased o_proj is attention_bias=True, attention_out_bias=False; Mistral's `sliding_window`, the
    same window in every layer, or None for full attention). Each FFN is a MoE:

    num_experts (`int`): routed experts per layer, all of `moe_intermediate_size` neurons.
    num_experts_per_tok (`int`): top-k when `router_top_p` is 0.
    moe_intermediate_size (`int`): neurons per routed expert.
    shared_expert_intermediate_size (`int`): neurons of the always-on shared expert (0: none).
    router_type (`str`): "flat" (one linear router) or "hierarchical" (a main router over `num_expert_groups` groups and
        one sub-router per group; an expert's probability is p_main(group) * p_sub(expert | group)).
    num_expert_groups (`int`): groups of the hierarchical router (experts of group g are contiguous).
    router_score (`str`): how a router scores experts (flat, and the main and sub-routers of a hierarchical one):
        "linear" (logit = w_e·x) or "gaussian" (each expert owns a mean and a diagonal scale in the router's input
        space; logit = b_e + β·log N(x; μ_e, diag σ_e²), a bias and one learned inverse temperature β per router) or
        "lowrank" (flat routers reading the FFN input only: each expert's neurons' SwiGLU activations predicted from
        rank-`router_rank` factors of their gate and up projections, ĥ = act(x A_g B_g) ⊙ x A_u B_u; an expert's score
        is Σ_j |ĥ_j|·c_j over its neurons, logit = log score; fine-grained experts down to single neurons) or "gate"
        (as "lowrank", but with the exact gate pre-activations x W_gᵀ read from the experts' own gate rows, so every
        routed neuron's gate is computed per token; the up pre-activation predicted at rank `router_rank`, or at rank
        0 replaced by a per-neuron constant folded into c_j).
    router_rank (`int`): rank of the "lowrank" router's factors, and of the "gate" router's up predictor (0: none).
    router_candidates (`int`): "gate" routers only, 0 = off: a second stage — each token's `router_candidates` experts
        of largest (estimated) score get their exact up pre-activations computed, and are ranked again by the exact
        Σ_j |act(x·g_j)·(x·u_j)|·‖d_j‖ (‖d_j‖ a learned per-neuron weight initialised to the down-projection column's
        norm); the selection is made among them. Costs the candidates' up rows per token.
    router_input (`str`): what the router sees: "ffn" (the FFN input, the usual), "embedding" (the token's input
        embedding) or "context" (the running mean of the input embeddings of the sequence so far, this token included).
    router_top_p (`float`): if > 0, dynamic top-k: the fewest experts whose probabilities sum to at least top_p,
        clamped to [min_experts_per_tok, max_experts_per_tok].
    expert_weighting (`str`): "straight_through" (selected experts' outputs are summed with weight exactly 1 and the
        router gets gradients through 1 + p - stopgrad(p); with every expert selected the MoE equals the dense FFN) or
        "probs" (outputs weighted by router probabilities, as in a standard MoE).
    router_aux_loss_coef (`float`): weight of the Switch load-balancing loss added to the LM loss.
    moe_output_bias (`bool`): each MoE block adds a learned vector to its output (zero-initialised; the carve fits it
        to the mean, on its calibration tokens, of what the dense FFN outputs and the block leaves out: the neurons a
        token does not run still add, on average, a constant direction, which no sum of selected experts restores).
    moe_mode (`str`): "sparse" (routing as above) or "dense_mixture" (training phase 1: every expert runs, weighted by
        E · p so that uniform routing equals the dense FFN).
    """

    model_type = "tiny_onn"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        attention_dropout: float = 0.0,
        use_qk_norm: bool = False,
        sliding_window: int | None = None,
        num_experts: int = 16,
        num_experts_per_tok: int = 4,
        moe_intermediate_size: int = 96,
        shared_expert_intermediate_size: int = 0,
        router_type: str = "flat",
        num_expert_groups: int = 1,
        router_score: str = "linear",
        router_input: str = "ffn",
        router_rank: int = 64,
        router_candidates: int = 0,
        router_top_p: float = 0.0,
        min_experts_per_tok: int = 1,
        max_experts_per_tok: int | None = None,
        expert_weighting: str = "straight_through",
        router_aux_loss_coef: float = 0.01,
        output_router_logits: bool = False,
        moe_output_bias: bool = False,
        moe_mode: str = "sparse",
        source_model_type: str = "llama",
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.attention_dropout = attention_dropout
        self.use_qk_norm = use_qk_norm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router_type = router_type
        self.num_expert_groups = num_expert_groups
        self.router_score = router_score
        self.router_input = router_input
        self.router_rank = router_rank
        self.router_candidates = router_candidates
        self.router_top_p = router_top_p
        self.min_experts_per_tok = min_experts_per_tok
        self.max_experts_per_tok = max_experts_per_tok if max_experts_per_tok is not None else num_experts
        self.expert_weighting = expert_weighting
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.moe_output_bias = moe_output_bias
        self.moe_mode = moe_mode
        self.source_model_type = source_model_type
        self.sliding_window = sliding_window  # read by transformers' mask helpers and DynamicCache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_moe()

    def validate_moe(self) -> None:
        """Raise ValueError naming the field when the MoE layout is inconsistent."""
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.router_score not in ROUTER_SCORES:
            raise ValueError(f"router_score must be one of {ROUTER_SCORES}, got {self.router_score!r}")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}")
        if self.router_score in ACTIVATION_SCORES and (self.router_type != "flat" or self.router_input != "ffn"):
            raise ValueError(f"router_score {self.router_score!r} scores the FFN's own activations: it needs router_type "
                             f"'flat' and router_input 'ffn', got {self.router_type!r} and {self.router_input!r}")
        if self.router_score == "lowrank" and self.router_rank < 1:
            raise ValueError(f"router_rank must be at least 1 for router_score 'lowrank', got {self.router_rank}")
        if self.router_score == "gate" and self.router_rank < 0:
            raise ValueError(f"router_rank must be at least 0 for router_score 'gate', got {self.router_rank}")
        if self.router_candidates:
            if self.router_score != "gate":
                raise ValueError(f"router_candidates (a second, exact stage) needs router_score 'gate', got "
                                 f"{self.router_score!r}")
            fewest = max(self.num_experts_per_tok, self.min_experts_per_tok)
            if not fewest <= self.router_candidates <= self.num_experts:
                raise ValueError(f"router_candidates must be between the experts chosen per token ({fewest}) and "
                                 f"num_experts ({self.num_experts}), or 0 (one stage); got {self.router_candidates}")
        if self.moe_mode not in ("sparse", "dense_mixture"):
            raise ValueError(f"moe_mode must be 'sparse' or 'dense_mixture', got {self.moe_mode!r}")
        if self.expert_weighting not in EXPERT_WEIGHTINGS:
            raise ValueError(f"expert_weighting must be one of {EXPERT_WEIGHTINGS}, got {self.expert_weighting!r}")
        if self.num_experts < 1 or self.moe_intermediate_size < 1:
            raise ValueError("num_experts and moe_intermediate_size must be positive")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (top-k) must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        if not 1 <= self.min_experts_per_tok <= self.max_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"need 1 <= min_experts_per_tok ({self.min_experts_per_tok}) <= max_experts_per_tok "
                f"({self.max_experts_per_tok}) <= num_experts ({self.num_experts})"
            )
        if not 0.0 <= self.router_top_p <= 1.0:
            raise ValueError(f"router_top_p must be in [0, 1] (0 = fixed top-k), got {self.router_top_p}")
        groups = self.num_expert_groups if self.router_type == "hierarchical" else 1
        if groups < 1 or self.num_experts % groups:
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of num_expert_groups ({groups})")
