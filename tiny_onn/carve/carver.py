"""Carve stage: scan + source -> a TinyOnn MoE folder (HF format) whose routers are calibrated before any training."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tiny_onn.artifacts import atomic_dir, check_replaceable, versions
from tiny_onn.carve.assemble import assemble, check_carvable
from tiny_onn.carve.calibrate import (
    REFINERS,
    calibrate_routers,
    calibrate_sequentially,
    collect_ffn_inputs,
    collect_router_inputs,
    fit_output_biases,
    fit_routers,
)
from tiny_onn.carve.cluster import balanced_kmeans, random_split
from tiny_onn.carve.features import neuron_features
from tiny_onn.carve.plan import CarvePlan, LayerPlan
from tiny_onn.carve.select import METHODS, SHARED_SCORES, keep_scores, shared_scores
from tiny_onn.carve.weighting import fit_expert_scales
from tiny_onn.config import config_to_dict
from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.data.pipeline import check_seed
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval import perplexity
from tiny_onn.model import TinyOnnForCausalLM
from tiny_onn.model.configuration_tiny_onn import (
    ACTIVATION_SCORES,
    EXPERT_WEIGHTINGS,
    ROUTER_INPUTS,
    ROUTER_SCORES,
    ROUTER_TYPES,
)
from tiny_onn.model.export import CARVE_META, read_carve_metadata, save_model_folder
from tiny_onn.scan import ScanResult
from tiny_onn.sources import Source, SourceArgs, load_source, swiglu_mlps
from tiny_onn.sources.loading import absolute_model_path, recorded_model, warn_if_beyond_positions, weights_agree

CALIB_INPUTS = ("dense", "carved")
log = logging.getLogger(__name__)
PRESETS = {"seed": {"experts": 100, "groups": 10, "router": "hierarchical", "top_k": 10}}


@dataclass
class CarveConfig(SourceArgs):
    """Carve a dense source into a Mixture-of-Experts using its scan."""

    scan: str = "runs/demo/scan"
    """Scan folder (from `tiny-onn scan`)."""
    model: str = ""
    """Source model; empty = the model recorded in the scan."""
    method: str = "dsc"
    """Neuron selection and split: dsc (keep by S_p; shared expert = the neurons whose worst per-category a·s importance is highest; clustering on activation fingerprints, weight rows, category profile and per-category ΔSC), random (the baseline), actgrad (LLaMA-MoE's a·s importance), coact (activation keep, co-activation clustering on |h| only)."""
    keep: float = 1.0
    """Fraction of each layer's neurons kept (top by the method's score)."""
    shared: float = 0.0
    """Fraction of each layer's neurons in the always-on shared expert (0 = none)."""
    shared_score: str = "importance"
    """dsc: what picks the shared expert, as the worst score over categories: importance (a·s) or s_p (the seed's S_p)."""
    experts: int = 16
    """Routed experts per layer (equal size)."""
    top_k: int = 4
    """Experts per token (fixed top-k routing)."""
    router: str = "flat"
    """Router: flat, or hierarchical (a main router over --groups groups, one sub-router per group); 'gaussian' is
    short for flat with --router-score gaussian."""
    router_score: str = "linear"
    """How routers score experts: linear, gaussian (each expert a diagonal Gaussian in the router's input space,
    initialised from the inputs of the calibration tokens it serves best; logit = b + β·log-likelihood), or lowrank
    (each expert's neurons' SwiGLU activations predicted from rank --router-rank factors of their gate and up
    projections, fitted to the calibration inputs; score = the sum of the predicted |h|·‖d‖; flat routers on the FFN
    input; the router for fine-grained experts, down to one neuron each: --experts = the routed neurons), or gate (as
    lowrank with the exact gate, read from the experts' own gate rows: every routed neuron's gate is computed per
    token, and counted as active; the up pre-activation predicted at --router-rank, or at rank 0 its root mean square
    on the calibration inputs)."""
    router_rank: int = 64
    """Rank of the lowrank router's factors (2·rank·(D + routed neurons) router parameters per layer); of the gate
    router's up predictor (rank·(D + routed neurons); 0: none)."""
    router_candidates: float = 0.0
    """Gate routers: a second, exact stage. Each token's c·top_k experts of largest estimated score (c = this value,
    at least 1) get their up projections computed and are ranked again by their exact Σ |h_j|·‖d_j‖; the top-k come
    from them. Those up rows are then active per token too. 0 = one stage."""
    router_input: str = "ffn"
    """What routers read: ffn (the FFN input), embedding (the token embedding) or context (the running mean of the
    sequence's embeddings)."""
    groups: int = 4
    """Expert groups of the hierarchical router."""
    top_p: float = 0.0
    """If > 0, dynamic top-k: the fewest experts whose router probabilities reach top_p (clamped to [min_k, max_k])."""
    min_k: int = 1
    """Dynamic routing: fewest experts per token."""
    max_k: int = 0
    """Dynamic routing: most experts per token (0 = all)."""
    expert_weighting: str = "straight_through"
    """straight_through (selected experts summed with weight 1, the default) or probs (each weighted by its softmax probability, as llama.cpp's MoE architectures do: needed for `tiny-onn export --format gguf`; a per-expert scale fitted after calibration is folded into the experts)."""
    preset: str = ""
    """Named layout overriding experts/groups/router/top_k: 'seed' = 100 experts in 10 groups, hierarchical, top-10."""
    data: str = ""
    """Calibration and evaluation data; empty = the scan's data."""
    seq_len: int = 256
    """Tokens per calibration/evaluation sequence."""
    calib_tokens: int = 16384
    """Calibration tokens for the routers (training split)."""
    calib_refine: str = "lbfgs"
    """How each router is refined on the calibration tokens after the least-squares fit: lbfgs (L-BFGS iterations) or
    adam (Adam steps, learning rate 1e-2: the refinement before L-BFGS)."""
    calib_steps: int = 60
    """Refinement iterations (calib_refine lbfgs) or steps (adam) per router; 0 = least squares only."""
    calib_inputs: str = "dense"
    """Which FFN inputs the routers are calibrated on: dense (the dense source's, all layers from one forward) or carved
    (layer by layer, the carved model's own, earlier routers already calibrated: the inputs the router will see;
    about L/2 extra forwards of the calibration tokens)."""
    output_bias: bool = False
    """Give every MoE block an output bias, fitted after the routers to the mean, on the calibration tokens, of the
    dense FFN's output minus the block's: the average contribution of the neurons a token does not run (D parameters
    per layer; not exportable to GGUF)."""
    eval_tokens: int = 4096
    """Held-out tokens for the dense-vs-carved perplexity check (0 = skip)."""
    weight_features: float = 0.5
    """Weight of the neurons' weight rows relative to their activation fingerprints in clustering."""
    delta_sc_features: float = 0.5
    """dsc: weight of each neuron's per-category ΔSC (z(a_c) − z(s_c) per data category) in clustering (0 = leave it out)."""
    pca_dims: int = 32
    """PCA components per feature block before clustering."""
    seed: int = 0
    """Seed for clustering and the random method."""
    plots: bool = True
    """Write UMAP and expert-size plots."""
    plots_out: str = ""
    """Plot folder; empty = a 'carve' folder beside --out."""
    out: str = "runs/demo/moe"
    """Output model folder (Hugging Face format, written atomically)."""

    def __post_init__(self) -> None:
        SourceArgs.__post_init__(self)
        check_seed(self.seed)
        if self.preset:
            if self.preset not in PRESETS:
                raise TinyOnnError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for k, v in PRESETS[self.preset].items():
                if getattr(self, k) not in (defaults[k], v):  # set by the user to something the preset replaces
                    raise TinyOnnError(f"--preset {self.preset} sets {k} = {v}, but {k} = {getattr(self, k)} was also "
                                       f"given; drop one of them")
                setattr(self, k, v)
        if self.method not in METHODS:
            raise TinyOnnError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.shared_score not in SHARED_SCORES:
            raise TinyOnnError(f"shared_score must be one of {', '.join(SHARED_SCORES)}, got {self.shared_score!r}")
        if self.delta_sc_features < 0 or self.weight_features < 0:
            raise TinyOnnError("weight_features and delta_sc_features must be non-negative (0 = leave that block out)")
        if not 0.0 < self.keep <= 1.0:
            raise TinyOnnError(f"keep must be in (0, 1], got {self.keep}")
        if not 0.0 <= self.shared < self.keep:
            raise TinyOnnError(f"shared must be in [0, keep={self.keep}), got {self.shared}")
        if self.experts < 1:
            raise TinyOnnError(f"experts must be positive, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise TinyOnnError(f"top_k must be between 1 and experts ({self.experts}), got {self.top_k}")
        if self.router == "gaussian":
            self.router, self.router_score = "flat", "gaussian"
        if self.router not in ROUTER_TYPES:
            raise TinyOnnError(f"router must be one of {', '.join(ROUTER_TYPES)} or gaussian, got {self.router!r}")
        if self.router_score not in ROUTER_SCORES:
            raise TinyOnnError(f"router_score must be one of {', '.join(ROUTER_SCORES)}, got {self.router_score!r}")
        if self.router_input not in ROUTER_INPUTS:
            raise TinyOnnError(f"router_input must be one of {', '.join(ROUTER_INPUTS)}, got {self.router_input!r}")
        if self.router_score in ACTIVATION_SCORES and (self.router != "flat" or self.router_input != "ffn"):
            raise TinyOnnError(f"--router-score {self.router_score} scores the FFN's own activations: use it with "
                               f"--router flat and --router-input ffn (got {self.router!r}, {self.router_input!r})")
        if self.router_rank < (0 if self.router_score == "gate" else 1):
            raise TinyOnnError(f"router_rank must be at least {0 if self.router_score == 'gate' else 1} for "
                               f"--router-score {self.router_score}, got {self.router_rank}")
        if self.router_candidates and self.router_score != "gate":
            raise TinyOnnError(f"--router-candidates (a second, exact stage) needs --router-score gate, got "
                               f"{self.router_score!r}")
        if self.router_candidates and not (self.router_candidates >= 1 and self.candidates <= self.experts):
            raise TinyOnnError(f"--router-candidates is a factor of top_k ({self.top_k}): at least 1, and at most "
                               f"{self.experts / self.top_k:g} (all {self.experts} experts); got {self.router_candidates:g}")
        if self.router == "hierarchical" and (self.groups < 1 or self.experts % self.groups):
            raise TinyOnnError(f"experts ({self.experts}) must be a multiple of groups ({self.groups})")
        if self.expert_weighting not in EXPERT_WEIGHTINGS:
            raise TinyOnnError(f"expert_weighting must be one of {', '.join(EXPERT_WEIGHTINGS)}, got {self.expert_weighting!r}")
        if self.expert_weighting == "probs" and (self.router != "flat" or self.top_p or self.router_score != "linear"
                                                 or self.router_input != "ffn"):
            raise TinyOnnError("expert_weighting probs is the llama.cpp-exportable layout: use it with --router flat, "
                               "--router-score linear, --router-input ffn and --top-p 0")
        if self.expert_weighting == "probs" and self.output_bias:
            raise TinyOnnError("expert_weighting probs is the llama.cpp-exportable layout, and --output-bias adds a bias "
                               "llama.cpp's MoE FFNs do not have: drop one of them")
        if not 0.0 <= self.top_p <= 1.0:
            raise TinyOnnError(f"top_p must be in [0, 1], got {self.top_p}")
        max_k = self.max_k or self.experts
        if not 1 <= self.min_k <= max_k <= self.experts:
            raise TinyOnnError(f"need 1 <= min_k ({self.min_k}) <= max_k ({max_k}) <= experts ({self.experts})")
        if self.seq_len < 2 or self.pca_dims < 1:
            raise TinyOnnError(f"seq_len must be at least 2 and pca_dims positive, got {self.seq_len} and {self.pca_dims}")
        if self.calib_tokens < 1 or self.eval_tokens < 0:
            raise TinyOnnError("calib_tokens must be positive and eval_tokens non-negative")
        if self.calib_refine not in REFINERS:
            raise TinyOnnError(f"calib_refine must be one of {', '.join(REFINERS)}, got {self.calib_refine!r}")
        if self.calib_inputs not in CALIB_INPUTS:
            raise TinyOnnError(f"calib_inputs must be one of {', '.join(CALIB_INPUTS)}, got {self.calib_inputs!r}")
        if self.calib_steps < 0:
            raise TinyOnnError(f"calib_steps must be >= 0 (0 = least squares only), got {self.calib_steps}")

    @property
    def candidates(self) -> int:
        """Candidate experts per token of a two-stage gate router (0: one stage)."""
        return math.floor(self.router_candidates * self.top_k + 0.5) if self.router_candidates else 0

    @property
    def num_groups(self) -> int:
        return self.groups if self.router == "hierarchical" else 1


def check_scan_matches(scan: ScanResult, source: Source) -> None:
    """A scan of another model would carve nonsense: compare the architectures."""
    mine, theirs = source.architecture, scan.meta.get("architecture", {})
    diff = [k for k in ("model_type", "num_layers", "hidden_size", "intermediate_size") if mine.get(k) != theirs.get(k)]
    if diff:
        detail = ", ".join(f"{k}: scan {theirs.get(k)} vs model {mine.get(k)}" for k in diff)
        raise TinyOnnError(f"the scan was made on another model ({scan.meta.get('model')}): {detail}")
    sample = scan.meta.get("weight_sample")  # absent in scans made before it was recorded
    if sample is not None and not weights_agree(sample, source.weight_sample()):
        raise TinyOnnError(f"the scan was made on another model ({scan.meta.get('model')}) of the same shape as "
                           f"{source.spec!r}: their weights differ; scan this model, or carve the scanned one")


def plan_layer(scan: ScanResult, mlp, cfg: CarveConfig, gen: torch.Generator) -> LayerPlan:
    """Select, pick the shared expert, cluster the rest into equal experts, group the experts."""
    N = mlp.num_neurons
    E = cfg.experts
    n_keep, n_shared = round(cfg.keep * N), round(cfg.shared * N)
    per_expert = (n_keep - n_shared) // E
    if per_expert < 1:
        raise TinyOnnError(
            f"{E} experts need at least {E} routed neurons per layer, but keep={cfg.keep} and shared={cfg.shared} "
            f"leave {n_keep - n_shared} of {N}: use fewer experts or keep more neurons"
        )
    score = keep_scores(scan, mlp.layer, cfg.method, gen)
    kept = score.topk(n_keep).indices
    shared = kept[:0]
    if n_shared:
        shared_score = shared_scores(scan, mlp.layer, cfg.method, gen, cfg.shared_score)
        shared = kept[shared_score[kept].topk(n_shared).indices]
    rest = kept[~torch.isin(kept, shared)]
    rest = rest[score[rest].topk(per_expert * E).indices]  # drop the weakest few so experts are equal
    if cfg.method == "random":
        labels = random_split(rest.numel(), E, gen)
        feats = None
    else:
        feats = neuron_features(scan, mlp, rest, cfg.method, cfg.weight_features, cfg.pca_dims, cfg.seed,
                                cfg.delta_sc_features)
        labels = balanced_kmeans(feats, E, cfg.seed)
    experts = [rest[torch.from_numpy(labels == e)].sort().values for e in range(E)]
    G = cfg.num_groups
    if G > 1:
        if feats is None:
            group_of = random_split(E, G, gen)
        else:
            centroids = np.stack([feats[labels == e].mean(0) for e in range(E)])
            group_of = balanced_kmeans(centroids, G, cfg.seed)
        experts = [experts[e] for e in np.argsort(group_of, kind="stable")]  # groups contiguous
    return LayerPlan(layer=mlp.layer, shared=shared.sort().values, experts=torch.stack(experts), groups=G)


def make_plan(scan: ScanResult, source: PreTrainedModel, cfg: CarveConfig) -> CarvePlan:
    gen = torch.Generator().manual_seed(cfg.seed)
    mlps = swiglu_mlps(source)
    routed = round(cfg.keep * mlps[0].num_neurons) - round(cfg.shared * mlps[0].num_neurons)
    if routed >= cfg.experts and routed % cfg.experts:  # fewer than one per expert: plan_layer's error says so
        log.warning("%d routed neurons per layer do not split into %d experts of equal size: the %d weakest are "
                    "dropped%s; choose an expert count that divides %d to keep them all", routed, cfg.experts,
                    routed % cfg.experts,
                    " (so even with every expert selected the MoE is not the dense model)" if cfg.keep >= 1 else "",
                    routed)
    layers = [plan_layer(scan, m, cfg, gen) for m in tqdm(mlps, desc="carve", unit="layer", leave=False)]
    return CarvePlan(layers=layers, method=cfg.method)


def warn_if_calibration_is_small(tokens: int, hidden_size: int) -> None:
    """A router reads the hidden state: fitted on fewer tokens than it has inputs, its fit rests on the ridge
    penalty alone, so the carve runs but routes poorly. Warn rather than refuse (a quick smoke test may want it)."""
    if tokens < hidden_size:
        log.warning("router calibration reads %d tokens, fewer than the model's hidden size %d (each router's inputs): "
                    "the routers are barely fitted; give --calib-tokens of several times %d (default 16384)",
                    tokens, hidden_size, hidden_size)


def carve_model(scan: ScanResult, source: Source, cfg: CarveConfig, calib_data=None) -> tuple[TinyOnnForCausalLM, CarvePlan, list]:
    """Plan, assemble and calibrate a MoE in memory (the stage's core, reused by benchmarks)."""
    plan = make_plan(scan, source.model, cfg)
    model = assemble(
        source.model, plan, dtype=next(source.model.parameters()).dtype,
        num_experts_per_tok=cfg.top_k, router_type=cfg.router, router_top_p=cfg.top_p,
        min_experts_per_tok=cfg.min_k, max_experts_per_tok=cfg.max_k or cfg.experts,
        expert_weighting=cfg.expert_weighting,
        router_score=cfg.router_score, router_input=cfg.router_input, router_rank=cfg.router_rank,
        router_candidates=cfg.candidates, moe_output_bias=cfg.output_bias,
    )
    report = []
    if calib_data is not None and cfg.calib_inputs == "carved":
        report, ffn_inputs = calibrate_sequentially(model, calib_data, refine_steps=cfg.calib_steps,
                                                    refine=cfg.calib_refine)
    elif calib_data is not None:
        ffn_inputs = collect_ffn_inputs(source.model, calib_data)
        router_inputs = collect_router_inputs(model, calib_data)
        if cfg.router_score in ("linear", *ACTIVATION_SCORES) and router_inputs is None:
            report = calibrate_routers(model, ffn_inputs, refine_steps=cfg.calib_steps, refine=cfg.calib_refine)
        else:  # Gaussian scorers, or routers that read a side input
            report = fit_routers(model, ffn_inputs, router_inputs, refine_steps=cfg.calib_steps,
                                 refine=cfg.calib_refine)
    if calib_data is not None and cfg.expert_weighting == "probs":
        for row, scales in zip(report, fit_expert_scales(model, ffn_inputs), strict=True):
            row["expert_scales"] = scales
    # last: the bias is the mean of what the finished block (routers, expert scales) leaves out
    if calib_data is not None and cfg.output_bias:
        for row, fit in zip(report, fit_output_biases(model, source.model, ffn_inputs), strict=True):
            row.update({k: v for k, v in fit.items() if k != "layer"})
    return model, plan, report


def active_fraction(plan: CarvePlan, top_k: int, source_neurons: int) -> float:
    return (plan.shared_size + top_k * plan.expert_size) / source_neurons


def export_folder(model: TinyOnnForCausalLM, source: Source, plan: CarvePlan, folder: Path, extra: dict) -> None:
    provenance = {
        "source_model": source.spec,
        "source_model_path": absolute_model_path(source.spec),
        "source_origin": source.origin,
        "method": plan.method,
        "layers": [lp.to_json() for lp in plan.layers],
    }
    # the source's decoding defaults (an instruct model's repetition penalty, say): the MoE generates as its source does
    if (generation := getattr(source.model, "generation_config", None)) is not None:
        model.generation_config = copy.deepcopy(generation)
    save_model_folder(model, source.tokenizer, folder, provenance, {CARVE_META: extra}, model_card(model, source, extra))


def model_card(model: TinyOnnForCausalLM, source: Source, extra: dict) -> str:
    c = model.config
    ppl = extra.get("perplexity") or {}
    lines = [
        "---", "library_name: transformers", "tags: [tiny-onn, mixture-of-experts]", "---", "",
        f"# TinyOnn MoE carved from {source.spec}", "",
        f"Carved by Tiny-ONN {extra['versions']['tiny_onn']} with method `{extra['config']['method']}` from {source.origin}.",
        "",
        "| | |", "|---|---|",
        f"| layers | {c.num_hidden_layers} |",
        f"| routed experts per layer | {c.num_experts} × {c.moe_intermediate_size} neurons |",
        f"| shared expert | {c.shared_expert_intermediate_size} neurons |",
        f"| router | {c.router_type}" + (f", {c.num_expert_groups} groups" if c.router_type == "hierarchical" else "")
        + f", {getattr(c, 'router_score', 'linear')} scores on the {getattr(c, 'router_input', 'ffn')} input |",
        f"| routing | top-{c.num_experts_per_tok}" + (f", top-p {c.router_top_p}" if c.router_top_p else "") + " |",
        f"| active FFN neurons | {extra['active_fraction']:.1%} of the source |",
    ]
    if ppl:
        lines += [
            f"| held-out perplexity (response tokens) | {ppl['carved']['ppl']:.2f} (dense source {ppl['dense']['ppl']:.2f}, "
            f"ratio {ppl['ratio']:.3f}) |",
        ]
    lines += [
        "", "Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` "
        "(or through `tiny_onn`, which registers the classes). `provenance.json` maps every expert to its source neurons.",
        "This model is untrained after carving unless a training section follows.", "",
    ]
    return "\n".join(lines)


PLOTS_MARKER = "expert_sizes.png"  # written last by write_carve_plots


def plots_folder(cfg: CarveConfig) -> Path:
    """Where the carve's plots go: `--plots-out`, else a `carve` folder beside the model folder (`carve-plots` when
    the model folder is itself named `carve`, which the plots would otherwise replace)."""
    if cfg.plots_out:
        return Path(cfg.plots_out)
    out = Path(cfg.out)
    return out.parent / ("carve-plots" if out.name == "carve" else "carve")


def run(cfg: CarveConfig) -> Path:
    """Carve `cfg.scan`'s model and write the MoE folder (and plots)."""
    model_out = check_replaceable(cfg.out, CARVE_META)
    if cfg.plots:
        plots_out = check_replaceable(plots_folder(cfg), PLOTS_MARKER, option="--plots-out")
        if plots_out == model_out or plots_out in model_out.parents or model_out in plots_out.parents:
            raise TinyOnnError(f"--plots-out {plots_folder(cfg)} and --out {cfg.out} overlap: the plots folder and the "
                               "model folder would replace each other; give them separate folders (or --no-plots)")
    scan = ScanResult.load(cfg.scan)
    scan_cfg = scan.meta.get("config", {})
    src_args = SourceArgs(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SourceArgs)})
    src_args.model = cfg.model or recorded_model(scan.meta, "model")
    try:
        source = load_source(src_args)
    except TinyOnnError as e:
        if cfg.model:
            raise
        raise TinyOnnError(f"{e} (the model named in {cfg.scan}/scan.json; pass --model to give its location)") from e
    check_scan_matches(scan, source)
    warn_if_beyond_positions(source.model.config, cfg.seq_len, "--seq-len")
    check_carvable(source.model.config)  # before the plan and the calibration, not after them
    data_args = DataArgs(data=cfg.data or scan_cfg.get("data", "default"), seq_len=cfg.seq_len,
                         heldout_fraction=scan_cfg.get("heldout_fraction", 0.1), seed=cfg.seed)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=cfg.calib_tokens)
    warn_if_calibration_is_small(calib.num_tokens, source.model.config.hidden_size)
    model, plan, calib_report = carve_model(scan, source, cfg, calib)
    N = swiglu_mlps(source.model)[0].num_neurons
    extra = {
        "format": "tiny_onn.moe/1",
        "scan": str(cfg.scan),
        "active_fraction": active_fraction(plan, cfg.top_k, N),
        "calibration": calib_report,
        "config": config_to_dict(cfg),
        "versions": versions(),
    }
    if cfg.eval_tokens:
        held = build_dataset(source.tokenizer, data_args, "heldout", max_tokens=cfg.eval_tokens)
        dense, carved = perplexity(source.model, held), perplexity(model, held)
        extra["perplexity"] = {"dense": dense, "carved": carved, "ratio": carved["ppl"] / dense["ppl"]}
    with atomic_dir(cfg.out, CARVE_META) as tmp:
        export_folder(model, source, plan, tmp, extra)
    if cfg.plots:
        from tiny_onn.carve.plots import write_carve_plots

        with atomic_dir(plots_folder(cfg), PLOTS_MARKER) as tmp:
            write_carve_plots(scan, source.model, plan, cfg, tmp)
    return Path(cfg.out)


def summary(cfg: CarveConfig, out: Path) -> str:
    """The line the CLI prints after carving."""
    extra = read_carve_metadata(out)
    line = f"MoE written to {out} ({extra['active_fraction']:.1%} of FFN neurons active per token)"
    if "perplexity" in extra:
        p = extra["perplexity"]
        line += (f"\nheld-out perplexity: dense {p['dense']['ppl']:.2f}, carved {p['carved']['ppl']:.2f} "
                 f"(ratio {p['ratio']:.3f})")
    return line
