"""Train stage: continued training of a carved MoE with expert-masked updates (full / SMK / SMK²), distillation from the
dense source, and the two-phase schedule; a dense model trains with the same recipe (policy full) as a control.
Runs on accelerate, so 1 CPU, 1 GPU or DDP use the same loop.

Laid out like a torchtune recipe: `Trainer.__init__` sets up (models, optimizer, data, resume), `Trainer.train_step` is
one optimizer step, `evaluate`, `save_checkpoint` / `resume`, and `finish` writes the outputs; `run` = `Trainer(cfg).fit()`.

Legend: B sequences per micro-batch, T positions, V vocabulary, E experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from tiny_onn import distributed
from tiny_onn.artifacts import atomic_dir, check_output_folder, check_replaceable, read_json, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data import DataArgs, PackedData, build_dataset, scored_positions
from tiny_onn.data.pipeline import data_identity
from tiny_onn.data.sources import same_data_spec, same_location
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval import perplexity
from tiny_onn.model.export import CARVE_META, TRAIN_META, read_carve_metadata, save_model_folder
from tiny_onn.sources import Source, SourceArgs, load_source
from tiny_onn.sources.loading import warn_if_beyond_positions
from tiny_onn.train.ewc import EWC
from tiny_onn.train.losses import (
    hidden_distill_sum,
    kd_sum,
    performance_index,
    pi_schedule,
    response_ce_sum,
    router_distill_kl,
    specificity_loss,
)
from tiny_onn.train.optim import MaskedAdamW
from tiny_onn.train.policies import POLICIES, expert_grad_norms, update_mask
from tiny_onn.train.replay import ReplayBuffer
from tiny_onn.train.routing import RouterTaps, TeacherGains
from tiny_onn.train.taps import LayerOutputTaps, check_same_stack

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(SourceArgs, DataArgs):
    """Continue training a carved TinyOnn MoE (or, as a control, a dense model with the same recipe)."""

    model: str = "runs/demo/moe"
    """The model to train: a MoE folder (from `tiny-onn carve`), or a dense model ('smollm2', a .gguf, a folder) as a
    control (then only --policy full applies and there are no experts, routers or load balance)."""
    teacher: str = ""
    """Dense teacher for distillation ('smollm2', a .gguf, a folder); empty = no distillation."""
    load_in_4bit: bool = False
    """Load the teacher in 4-bit NF4 with bitsandbytes (CUDA only); the trained model itself is never quantized."""
    ce_weight: float = 1.0
    """Weight of the next-token CE on response tokens (0 = pure distillation: needs --kd > 0).
    Loss = ce_weight·CE + kd·T²·KL + α_lb·load balance + z_loss_coef·z."""
    kd: float = 0.0
    """Weight α_kd of the distillation loss α·T²·KL(teacher ‖ student)."""
    kd_temperature: float = 1.0
    """Distillation temperature T (1: the teacher's own distribution; T = 2 kept the same facts and lost general-text perplexity in benchmarks/knowledge_recovery.py)."""
    hidden_kd: float = 0.0
    """Weight of hidden-state distillation: per token, the mean over decoder layers of ‖h − h_teacher‖² / ‖h_teacher‖²
    (h a layer's output), on the positions KD scores and scaled like it (needs --teacher, of the same depth and width;
    0 = off)."""
    policy: str = "smk2"
    """Expert update policy: full, smk (min_k lowest-gradient experts), smk2 (max_k highest ΔSC experts)."""
    max_k: int = 4
    """smk2: experts updated per layer and step."""
    min_k: int = 4
    """smk: experts updated per layer and step."""
    only_routed: bool = True
    """smk/smk2: choose only among experts that received tokens this step."""
    adaptive_k: bool = False
    """Phase 2: scale the number of updated experts by (1 − PI) (fewer updates as the model predicts well)."""
    phase1_steps: int = 0
    """Steps of phase 1 (dense softmax mixture: every expert runs and gets gradients); 0 = start sparse."""
    phase2_pi: float = 0.0
    """Also switch to phase 2 as soon as PI reaches this value (0 = only by step)."""
    top_p: float = 0.0
    """Phase 2 dynamic routing threshold (0 = keep the model's fixed top-k)."""
    top_k_start: int = 0
    """Gradual sparsification: start with this many experts per token and lower the top-k linearly to the model's own
    over the first --top-k-anneal share of the steps (0 = train at the model's top-k throughout). The saved model keeps
    its own top-k."""
    top_k_anneal: float = 0.5
    """--top-k-start: the share of the steps over which the top-k falls to the model's (the rest run at it)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-5
    """Learning rate of experts and other trainable weights."""
    router_lr: float = 1e-3
    """Learning rate of the routers."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    clip: float = 1.0
    """Gradient-norm clipping over what updates: masked experts' gradients do not count (0 = off)."""
    aux_loss_coef: float = 0.01
    """Weight α_lb of the Switch load-balancing loss (MoE only)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss."""
    train_experts: bool = True
    """Train the routed experts (in a dense model: its FFNs)."""
    train_shared: bool = True
    """Train the shared expert."""
    train_routers: bool = True
    """Train the routers."""
    train_attention: bool = False
    """Train attention and norms."""
    train_embeddings: bool = False
    """Train embeddings and the LM head."""
    pi_alpha: float = 0.5
    """PI's α."""
    pi_gamma: float = 0.1
    """PI's γ (weight of the gradient norm against ε/τ)."""
    pi_schedule: bool = False
    """PI-driven schedule: every step, learning rates × (floor + (1 − floor)·(1 − PI)) and, for smk/smk2, the experts
    updated per layer = max(1, round(act_k·(1 − PI))), act_k the layer's experts that computed this step (replaces
    --max-k/--min-k and --adaptive-k). Logged as lr_scale and experts_updated_mean."""
    pi_lr_floor: float = 0.1
    """--pi-schedule: the learning-rate scale at PI = 1."""
    router_distill: float = 0.0
    """Weight of router distillation: per layer, KL(softmax(teacher's expert gains) ‖ router) averaged over tokens, the
    gains being those the carve calibrates on, computed from the --teacher's own neurons of each expert (needs
    --teacher, the carve's source). Trains only the routers (their input is detached)."""
    specificity: float = 0.0
    """Weight of the expert specificity loss: per layer, the routing-mass-weighted entropy of each expert's mean routing
    probability across the batch's data categories, normalised to [0, 1] (0 = every expert serves one category). Trains
    only the routers."""
    perpetual: bool = False
    """Perpetual mode: one expert per layer updates each step (sets --policy smk --min-k 1); guard it with
    --replay-data and --ewc."""
    replay_data: str = ""
    """Earlier data replayed beside the new --data (a data spec, e.g. 'default'); empty = no replay."""
    replay_size: int = 256
    """Sequences kept in the replay buffer (the first ones of --replay-data's training split)."""
    replay_ratio: float = 0.25
    """Share of each micro-batch's sequences drawn from the replay buffer (the rest is new data)."""
    ewc: float = 0.0
    """EWC strength λ: penalty (λ/2)·Σ F̂·(θ − θ*)² on the expert weights, θ* the start weights, F̂ the empirical
    Fisher diagonal on earlier data normalised to mean 1 (0 = off)."""
    ewc_data: str = ""
    """Earlier data for the EWC Fisher estimate; empty = --replay-data."""
    ewc_samples: int = 16
    """Sequences (one backward each) for the EWC Fisher estimate."""
    eval_tokens: int = 4096
    """Held-out tokens for perplexity before and after training (0 = skip)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps, and at the last step, so a finished run can be extended with --resume --steps (0 = no checkpoints)."""
    resume: bool = False
    """Continue from the latest checkpoint in --out."""
    log_every: int = 1
    """Log to TensorBoard every N steps."""
    out: str = "runs/demo/train"
    """Output folder: checkpoints/, tb/, model/ (the trained HF folder), train.json."""

    def __post_init__(self) -> None:
        SourceArgs.__post_init__(self)
        DataArgs.__post_init__(self)
        if self.policy not in POLICIES:
            raise TinyOnnError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_k", "min_k", "log_every"):
            if getattr(self, name) < 1:
                raise TinyOnnError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("phase1_steps", "phase2_pi", "weight_decay", "warmup_steps", "clip", "aux_loss_coef",
                     "z_loss_coef", "pi_alpha", "pi_gamma", "eval_tokens", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise TinyOnnError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.phase2_pi > 1:
            raise TinyOnnError(f"--phase2-pi must be in [0, 1] (PI = exp(−α·(surprise)) is at most 1, "
                               f"so a larger value never switches), got {self.phase2_pi}")
        if self.kd < 0 or (self.kd > 0 and not self.teacher):
            raise TinyOnnError("--kd needs a --teacher (and must be non-negative)")
        if self.kd_temperature <= 0:
            raise TinyOnnError("kd_temperature must be positive")
        if self.hidden_kd < 0 or (self.hidden_kd > 0 and not self.teacher):
            raise TinyOnnError(f"--hidden-kd needs a --teacher (and must be non-negative), got {self.hidden_kd}")
        for name in ("lr", "router_lr"):
            if not getattr(self, name) > 0:  # also NaN
                raise TinyOnnError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.ce_weight < 0 or (self.ce_weight == 0 and not self.kd):
            raise TinyOnnError(f"ce_weight must be non-negative, and 0 (pure distillation) needs --kd > 0; got "
                               f"ce_weight={self.ce_weight}, kd={self.kd}")
        if self.load_in_4bit and not self.teacher:
            raise TinyOnnError("--load-in-4bit loads the teacher in 4 bits (the trained model never is): it needs a --teacher")
        self._check_seed_mechanisms()

    @property
    def updated_experts(self) -> int:
        """smk/smk2: the experts updated per layer and step (--min-k, --max-k)."""
        return self.max_k if self.policy == "smk2" else self.min_k

    def warn_of_unused_options(self) -> None:
        """Warnings for options that would do nothing (once per run, from the Trainer: a config is built again by
        `dataclasses.replace`, e.g. when alchemy resumes)."""
        if self.top_k_start and anneal_span(self.steps, self.top_k_anneal) == 0:
            log.warning("--top-k-start %d: --top-k-anneal %g of %d step(s) is less than one step, so every step trains "
                        "at the model's own top-k; give a larger --top-k-anneal or more --steps to anneal",
                        self.top_k_start, self.top_k_anneal, self.steps)
        if self.teacher and not (self.kd or self.hidden_kd or self.router_distill):
            log.warning("--teacher %s is loaded but unused: it serves --kd, --hidden-kd and --router-distill, all 0 "
                        "here (e.g. --kd 1 distils from it)", self.teacher)

    def _check_seed_mechanisms(self) -> None:
        """Router losses, the PI schedule and perpetual mode (replay, EWC)."""
        if self.perpetual:
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            conflicts = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name, own in
                         (("policy", "smk"), ("min_k", 1), ("max_k", None))
                         if getattr(self, name) not in (own, defaults[name])]
            if conflicts:
                raise TinyOnnError(f"--perpetual trains with --policy smk --min-k 1 (one expert per layer a step), so "
                                   f"{' and '.join(conflicts)} would be overridden; leave {'them' if len(conflicts) > 1 else 'it'} "
                                   "out, or drop --perpetual")
            self.policy, self.min_k = "smk", 1
        for name in ("router_distill", "specificity", "ewc"):
            if not getattr(self, name) >= 0:  # also NaN
                raise TinyOnnError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        if self.router_distill and not self.teacher:
            raise TinyOnnError("--router-distill needs a --teacher (the dense source the MoE was carved from)")
        if not 0.0 <= self.pi_lr_floor <= 1.0:
            raise TinyOnnError(f"pi_lr_floor must be in [0, 1], got {self.pi_lr_floor}")
        if not 0.0 <= self.top_p <= 1.0:
            raise TinyOnnError(f"top_p must be in [0, 1] (0 = fixed top-k), got {self.top_p}")
        if self.top_k_start < 0 or not 0.0 < self.top_k_anneal <= 1.0:
            raise TinyOnnError(f"--top-k-start must be non-negative (0 = off) and --top-k-anneal in (0, 1], got "
                               f"{self.top_k_start} and {self.top_k_anneal}")
        if self.top_k_start and self.top_p:
            raise TinyOnnError("--top-k-start anneals a fixed top-k; --top-p routes by a threshold instead: give one")
        if self.top_k_start and self.phase1_steps:
            raise TinyOnnError("--top-k-start anneals the sparse routing from the first step; --phase1-steps runs every "
                               "expert first, so the anneal would pass unseen: give one")
        if self.replay_data:
            if not 0.0 < self.replay_ratio < 1.0 or self.replay_size < 1:
                raise TinyOnnError(f"replay needs 0 < replay_ratio < 1 and replay_size >= 1, got {self.replay_ratio} "
                                   f"and {self.replay_size}")
            if not 1 <= self.replayed_per_micro_batch < self.batch_size:
                fix = ("use --batch-size 2 or more" if self.batch_size < 2 else
                       f"use a --replay-ratio from {1 / self.batch_size:.3g} to {(self.batch_size - 1) / self.batch_size:.3g}"
                       " (one to all but one of the batch's sequences), or a larger --batch-size")
                raise TinyOnnError(f"replay_ratio {self.replay_ratio} of batch_size {self.batch_size} replays "
                                   f"{self.replayed_per_micro_batch} sequences: it must leave at least one new and one "
                                   f"replayed sequence per micro-batch; {fix}")
        if self.ewc and not (self.ewc_data or self.replay_data):
            raise TinyOnnError("--ewc needs earlier data for its Fisher estimate: --ewc-data or --replay-data")
        if self.ewc_samples < 1:
            raise TinyOnnError(f"ewc_samples must be positive, got {self.ewc_samples}")

    @property
    def replayed_per_micro_batch(self) -> int:
        """Sequences of each micro-batch that come from the replay buffer."""
        return round(self.replay_ratio * self.batch_size) if self.replay_data else 0


def _set_trainable(model, cfg: TrainConfig) -> None:
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.requires_grad_(cfg.train_experts)
        elif ".mlp.shared_expert." in name:
            p.requires_grad_(cfg.train_shared)
        elif ".mlp.router." in name:
            p.requires_grad_(cfg.train_routers)
        elif ".mlp." in name:  # a dense model's FFN: trained like the experts it would be carved into
            p.requires_grad_(cfg.train_experts)
        elif "embed_tokens" in name or "lm_head" in name:
            p.requires_grad_(cfg.train_embeddings)
        else:
            p.requires_grad_(cfg.train_attention)


def model_fingerprint(model) -> str:
    """Parameter names and shapes: a checkpoint must come from a model with the same layout."""
    text = json.dumps([(n, list(p.shape)) for n, p in model.named_parameters()])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step` of `total`: a linear warm-up over `warmup` steps (at most `total`, so that a
    short run still reaches the full rate on its last warm-up step), then a cosine decay to 0.1. A run fixes its
    warm-up when it starts (`TrainState.warmup`), so a resumed run with a larger `total` keeps it."""
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights, the optimizer and the RNGs."""

    step: int
    """Optimizer steps done."""
    phase: int
    """1 = dense mixture (forced differentiation), 2 = sparse (adaptive emergence)."""
    pi: float
    """PI of the last step (drives the switch to phase 2 and adaptive k)."""
    history: list[dict]
    """One record per step."""
    update_counts: torch.Tensor
    """[layers, E, C] expert updates weighted by each step's token share of category c."""
    category_mass: torch.Tensor
    """[C] summed token share of each category over the steps."""
    ppl_before: dict | None = None
    """Held-out perplexity before training."""
    warmup: int = 0
    """Warm-up steps of the learning-rate schedule, fixed when the run starts (--warmup-steps, cut to the run's first
    --steps), so that a run resumed with more --steps keeps its schedule."""

    anneal_steps: int = 0
    """--top-k-start: the step at which the top-k reaches the model's own (`anneal_span`), fixed when the run starts,
    so that a run resumed with more --steps does not route densely again."""

    def to_json(self) -> dict:
        """The JSON part (the tensors go to a safetensors file)."""
        return {"step": self.step, "phase": self.phase, "pi": self.pi, "history": self.history,
                "ppl_before": self.ppl_before, "warmup": self.warmup, "anneal_steps": self.anneal_steps}


class Checkpoints:
    """checkpoints/step-NNNNNN folders (written atomically) and a `latest` pointer; the last two are kept."""

    def __init__(self, root: Path):
        self.root = root / "checkpoints"

    def latest(self) -> Path | None:
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        folder = self.root / read_json(pointer, "checkpoint pointer")["folder"]
        return folder if folder.is_dir() else None

    def save(self, model, optimizer, state: TrainState, meta: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the checkpoint of `state.step` (`extra`: more tensors to keep, e.g. EWC's anchor and Fisher)."""
        name = f"step-{state.step:06d}"
        with atomic_dir(self.root / name, "optimizer.pt") as tmp:
            if extra:
                save_file({k: v.contiguous() for k, v in extra.items()}, tmp / "extra.safetensors")
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
            save_file({"update_counts": state.update_counts, "category_mass": state.category_mass},
                      tmp / "counters.safetensors")
            write_json(tmp / "state.json", {**meta, **state.to_json(), "python_rng": list(random.getstate())})
        write_json(self.root / "latest.json", {"folder": name, "step": state.step})
        for old in sorted(self.root.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return self.root / name

    @staticmethod
    def load(folder: Path, model, optimizer, fingerprint: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore weights, optimizer and RNGs from `folder`; return its state.json and its counters (empty if none).
        Extra tensors (`save(extra=...)`) are read with `load_extra`."""
        meta = read_json(folder / "state.json", "checkpoint state")
        if meta.get("model_fingerprint") != fingerprint:
            raise TinyOnnError(
                f"checkpoint {folder} was made for a different model (layout {meta.get('model_fingerprint')} vs "
                f"{fingerprint}); use another --out or drop --resume"
            )
        load_model(model, str(folder / "model.safetensors"))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        torch.set_rng_state(load_file(folder / "rng.safetensors")["torch_rng"])
        random.setstate((meta["python_rng"][0], tuple(meta["python_rng"][1]), meta["python_rng"][2]))
        counters = folder / "counters.safetensors"
        return meta, load_file(counters) if counters.is_file() else {}

    @staticmethod
    def load_extra(folder: Path) -> dict[str, torch.Tensor]:
        path = folder / "extra.safetensors"
        return load_file(path) if path.is_file() else {}


# what a step that trains logs (TensorBoard and its history record) beside PI and lr; a skipped step has them as None
STEP_METRICS = ("ce", "kd", "hidden_kd", "lb", "z", "router_distill", "specificity", "ewc", "grad_norm",
                "update_grad_norm", "lr_scale", "tokens_per_second", "experts_updated_mean")


def step_batches(data: PackedData, step: int, cfg: TrainConfig, rank: int, world: int,
                 replay: ReplayBuffer | None = None) -> tuple[list[dict], int]:
    """This rank's micro-batches of global step `step` (the data cycles; with a replay buffer, each micro-batch's last
    `replayed_per_micro_batch` sequences are replayed), and the step's global count of scored tokens."""
    n_replay = cfg.replayed_per_micro_batch if replay is not None else 0
    new = cfg.batch_size - n_replay
    per_step = new * cfg.grad_accum * world
    rows = torch.arange(step * per_step, (step + 1) * per_step) % len(data)
    replayed = replay.draw(step, n_replay * cfg.grad_accum * world) if n_replay else None
    labels = [data.labels[rows]] + ([replay.data.labels[replayed]] if n_replay else [])
    scored = sum(int(scored_positions(lab)[1].sum()) for lab in labels)
    fields = ("input_ids", "labels", "attention_mask", "category")
    micro = []
    for m in range(cfg.grad_accum):
        slot = m * world + rank
        batch = {k: getattr(data, k)[rows[slot * new : (slot + 1) * new]] for k in fields}
        if n_replay:
            old = replay.rows(replayed[slot * n_replay : (slot + 1) * n_replay])
            batch = {k: torch.cat([batch[k], old[k]]) for k in fields}
        micro.append(batch)
    return micro, scored


def load_models(cfg: TrainConfig) -> tuple[Source, torch.nn.Module | None]:
    """The model to train (never quantized) and the frozen teacher (4-bit when `cfg.load_in_4bit`), or None."""
    src_args = SourceArgs(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SourceArgs)})
    student = load_source(dataclasses.replace(src_args, load_in_4bit=False), dense_only=False)
    warn_if_beyond_positions(student.model.config, cfg.seq_len, "--seq-len")
    if not cfg.teacher:
        return student, None
    teacher_source = load_source(dataclasses.replace(src_args, model=cfg.teacher))
    teacher = teacher_source.model
    same_tokenizer = teacher_source.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    if same_tokenizer and teacher.config.vocab_size != student.model.config.vocab_size:
        raise TinyOnnError(f"the teacher {cfg.teacher!r} has {teacher.config.vocab_size} output rows and the student "
                           f"{cfg.model!r} {student.model.config.vocab_size}, with the same tokenizer (embeddings "
                           "padded to another size): distillation compares the two distributions row by row, so it "
                           "needs the same size; give the dense source the student was carved from")
    if not same_tokenizer:
        raise TinyOnnError(f"the teacher {cfg.teacher!r} tokenizes differently from the student {cfg.model!r} (another "
                           "vocabulary): distillation compares them token by token, so it needs the student's own "
                           "tokenizer; give the dense source the student was carved from")
    teacher.requires_grad_(False)
    return student, teacher


def check_model_fits_config(model, cfg: TrainConfig) -> None:
    """Expert options need a MoE; a policy's k must not exceed the experts."""
    if model.config.model_type != "tiny_onn":
        moe_options = [name for name in ("phase1_steps", "phase2_pi", "top_p", "top_k_start", "adaptive_k",
                                         "z_loss_coef", "router_distill", "specificity", "perpetual")
                       if getattr(cfg, name)]
        if cfg.policy != "full" or moe_options:
            raise TinyOnnError(
                f"{cfg.model!r} is a dense model: it has no experts, so only --policy full applies"
                + (f" and {', '.join(moe_options)} must stay off" if moe_options else "")
                + f" (got --policy {cfg.policy}); carve a MoE first (`tiny-onn carve`) to train experts"
            )
        return
    E = model.config.num_experts
    check_top_k_start(model.config, cfg.top_k_start)
    k = cfg.updated_experts
    if cfg.policy != "full" and k > E:
        option = "--max-k" if cfg.policy == "smk2" else "--min-k"
        raise TinyOnnError(f"{option} {k} is larger than the model's {E} experts per layer: give {option} {E} or "
                           f"less, or --policy full")


def check_top_k_start(config, top_k_start: int) -> None:
    """--top-k-start must lie between the model's top-k and what its routers can select: every expert, or for a
    two-stage router its candidates (beyond them the selection would take arbitrary non-candidates)."""
    if not top_k_start:
        return
    if getattr(config, "router_top_p", 0.0) > 0:
        raise TinyOnnError(f"--top-k-start anneals a fixed top-k, but this MoE routes by top-p {config.router_top_p} "
                           "(carved with --top-p), which decides how many experts run: drop --top-k-start, or carve "
                           "with a fixed --top-k")
    k, E = config.num_experts_per_tok, config.num_experts
    candidates = getattr(config, "router_candidates", 0)
    most, what = (candidates, f"its two-stage routers' {candidates} candidates") if candidates else (E, f"its {E} experts")
    if not k <= top_k_start <= most:
        raise TinyOnnError(f"--top-k-start {top_k_start} must lie between the model's top-k ({k}) and {what} per "
                           f"token; give a value in {k}..{most}, or 0 to train at top-{k} throughout")


def anneal_span(steps: int, anneal: float) -> int:
    """The step at which --top-k-start's top-k reaches the model's own: round(anneal · steps), at the latest the last
    step (0: no step anneals)."""
    return max(min(round(anneal * steps), steps - 1), 0)


def annealed_top_k(step: int, span: int, start: int, end: int) -> int:
    """The top-k of step `step` (0-based): `start` at step 0, falling linearly to `end`, reached at step `span`
    (`anneal_span`) and kept from there on."""
    if step >= span:
        return end
    return round(start + (end - start) * step / span)


def build_optimizer(model, cfg: TrainConfig) -> MaskedAdamW:
    """MaskedAdamW over the trainable parameters: routers at router_lr, everything else at lr."""
    router_params = [p for n, p in model.named_parameters() if ".mlp.router." in n and p.requires_grad]
    other_params = [p for n, p in model.named_parameters() if ".mlp.router." not in n and p.requires_grad]
    groups = [g for g in ({"params": other_params, "lr": cfg.lr}, {"params": router_params, "lr": cfg.router_lr})
              if g["params"]]
    if not groups:
        raise TinyOnnError("nothing to train: every --train-* switch is off")
    return MaskedAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """One training run, laid out like a torchtune recipe: setup (`__init__`), `train_step`, `evaluate`,
    `save_checkpoint` / `resume`, `finish`; `fit` is the loop that ties them together."""

    # ---- setup ---------------------------------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator

        self.cfg = cfg
        self.rank, self.world = distributed.init_from_env()
        if self.rank == 0:
            cfg.warn_of_unused_options()
        cfg.device = distributed.local_device(cfg.device)
        self.out = Path(cfg.out)
        self.made_out = not self.out.exists()  # what a failed run may remove again
        self.made_tb = not (self.out / "tb").exists()
        check_train_out(cfg)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.source, self.teacher = load_models(cfg)
        self.model = self.source.model
        check_model_fits_config(self.model, cfg)
        self.is_moe = self.model.config.model_type == "tiny_onn"
        self.accelerator = Accelerator(
            cpu=next(self.model.parameters()).device.type == "cpu",
            mixed_precision="bf16" if torch.cuda.is_available() and cfg.dtype != "fp32" else "no",
        )
        _set_trainable(self.model, cfg)
        self.model.train()
        self.experts = [layer.mlp.experts for layer in self.model.model.layers] if self.is_moe else []
        if self.is_moe:
            self.model.track_expert_stats(True)
        self.k = cfg.updated_experts
        self.optimizer = build_optimizer(self.model, cfg)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.fingerprint = model_fingerprint(self.model)
        self.checkpoints = Checkpoints(self.out)
        if not cfg.resume and self.checkpoints.latest() is not None:
            raise TinyOnnError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        tok = self.source.tokenizer
        global_rows = cfg.steps * cfg.batch_size * cfg.grad_accum * self.world
        self.data = build_dataset(tok, cfg, "train", max_tokens=global_rows * cfg.seq_len)
        self.held = build_dataset(tok, cfg, "heldout", max_tokens=cfg.eval_tokens) if cfg.eval_tokens else None
        self.replay = ReplayBuffer.build(tok, cfg, cfg.replay_data, cfg.replay_size) if cfg.replay_data else None
        self.state = self.resume() if cfg.resume else self.fresh_state()
        self.ewc = self.setup_ewc(tok) if cfg.ewc else None
        self.router_taps = RouterTaps(self.model) if self.is_moe and (cfg.router_distill or cfg.specificity) else None
        self.teacher_gains = TeacherGains(self.teacher, cfg.model, self.model) if cfg.router_distill else None
        self.layer_taps = None
        if cfg.hidden_kd:
            check_same_stack(self.model, self.teacher)
            self.layer_taps = (LayerOutputTaps(self.model), LayerOutputTaps(self.teacher))
        self.ddp_model = self.accelerator.prepare(self.model)
        if self.held is not None and self.state.ppl_before is None:
            self.state.ppl_before = self.evaluate()
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))

    def setup_ewc(self, tokenizer) -> EWC:
        """EWC's anchor and Fisher: from the checkpoint when resuming, else estimated now on the earlier data."""
        cfg = self.cfg
        latest = self.checkpoints.latest() if cfg.resume else None
        if latest is not None and (saved := Checkpoints.load_extra(latest)):
            return EWC.from_state(self.model, saved, cfg.ewc)
        spec = cfg.ewc_data or cfg.replay_data
        args = DataArgs(data=spec, seq_len=cfg.seq_len, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed)
        data = build_dataset(tokenizer, args, "train", max_tokens=cfg.ewc_samples * cfg.seq_len)
        data = PackedData(*(getattr(data, k)[: cfg.ewc_samples] for k in ("input_ids", "labels", "attention_mask",
                                                                          "category")), data.category_names)
        log.info("estimating the EWC Fisher diagonal on %d sequences of %s", len(data), spec)
        return EWC.estimate(self.model, data, cfg.ewc)

    def fresh_state(self) -> TrainState:
        E = self.model.config.num_experts if self.is_moe else 0
        C = len(self.data.category_names)
        return TrainState(step=0, phase=1 if self.cfg.phase1_steps > 0 else 2, pi=0.0, history=[],
                          update_counts=torch.zeros(len(self.experts), E, C), category_mass=torch.zeros(C),
                          warmup=min(self.cfg.warmup_steps, self.cfg.steps),
                          anneal_steps=anneal_span(self.cfg.steps, self.cfg.top_k_anneal) if self.cfg.top_k_start else 0)

    # ---- one training step ---------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One optimizer step: phase and learning rate, forward/backward over the micro-batches, PI, this step's
        expert update masks, clipping over what updates, the masked AdamW step. Returns the step's history record."""
        cfg, opt, t0 = self.cfg, self.optimizer, time.perf_counter()
        self._enter_phase(step)
        for ex in self.experts:
            ex.reset_stats()
        micro, scored_global = step_batches(self.data, step, cfg, self.rank, self.world, self.replay)
        if scored_global == 0:
            return self.skipped_step(step, t0)
        losses, cat_tokens = self.forward_backward(micro, scored_global, step)
        grad_norm = opt.clip_grad_norm_(float("inf"))  # every trainable gradient: PI's S (no mask set yet)
        self.state.pi = performance_index(losses["ce"], losses["entropy"], grad_norm, cfg.pi_alpha, cfg.pi_gamma)
        lr_scale = pi_schedule(self.state.pi, 1, cfg.pi_lr_floor)[0] if cfg.pi_schedule else 1.0
        for group, base_lr in zip(opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * lr_lambda(step, self.state.warmup, cfg.steps) * lr_scale
        share = cat_tokens / cat_tokens.sum().clamp_min(1)  # [C] this step's token share per category
        updated = self.mask_experts(share)
        update_norm = opt.clip_grad_norm_(cfg.clip if cfg.clip > 0 else float("inf"))  # masks set: what updates
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.state.category_mass += share
        dt = time.perf_counter() - t0
        tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro)) * self.world
        return {"step": step + 1, "phase": self.state.phase, "scored_tokens": scored_global,
                "ce": losses["ce"], "kd": losses["kd"], "lb": losses["lb"],
                "z": losses["z"], "router_distill": losses["rd"], "specificity": losses["sp"], "ewc": losses["ewc"],
                "hidden_kd": losses["hidden_kd"],
                "pi": self.state.pi, "grad_norm": grad_norm, "update_grad_norm": update_norm,
                "lr": opt.param_groups[0]["lr"], "lr_scale": lr_scale, "tokens_per_second": tokens / dt,
                "experts_updated_mean": sum(updated) / max(len(updated), 1), "step_seconds": dt,
                **({"top_k": self.model.moe_blocks()[0].routing.top_k} if self.is_moe else {})}

    def skipped_step(self, step: int, t0: float) -> dict:
        """A step whose sequences hold no response token (packed rows that fall inside long prompts, at a short
        seq_len): nothing to learn from, so no update — no optimizer step, PI and phase as they were — instead of a
        CE of 0 that would read as a perfect prediction (PI ≈ 1, which can end phase 1 early). Its history record has
        the losses as None and `skipped` set."""
        lr = self.base_lrs[0] * lr_lambda(step, self.state.warmup, self.cfg.steps)
        return {"step": step + 1, "phase": self.state.phase, "scored_tokens": 0, **dict.fromkeys(STEP_METRICS),
                "pi": self.state.pi, "lr": lr, "skipped": "no response tokens in this step's sequences",
                "step_seconds": time.perf_counter() - t0}

    def _enter_phase(self, step: int) -> None:
        """Switch to phase 2 at phase1_steps or when PI reaches phase2_pi; tell the MoE layers how to route."""
        cfg, state = self.cfg, self.state
        if state.phase == 1 and (step >= cfg.phase1_steps or (cfg.phase2_pi and state.pi >= cfg.phase2_pi)):
            state.phase = 2
        if self.is_moe:
            self.model.set_routing(mode="dense_mixture" if state.phase == 1 else "sparse")
            if state.phase == 2 and cfg.top_p:
                self.model.set_routing(top_p=cfg.top_p)
            if cfg.top_k_start:
                k = annealed_top_k(step, state.anneal_steps, cfg.top_k_start, self.model.config.num_experts_per_tok)
                self.model.set_routing(top_k=k)

    def forward_backward(self, micro: list[dict], scored_global: int, step: int) -> tuple[dict, torch.Tensor]:
        """Accumulate the gradients of the step's micro-batches; return the losses as global means and the [C] count of
        scored tokens per category (both summed over ranks)."""
        C = self.state.category_mass.numel()
        # ce, kd, lb, z, entropy·n, n, router distill, specificity, ewc, hidden kd
        sums = torch.zeros(10, dtype=torch.float64)
        cat_tokens = torch.zeros(C)
        for mb in micro:
            mb = {k: v.to(self.accelerator.device) for k, v in mb.items()}
            with self.accelerator.autocast():
                loss, parts = self.micro_batch_loss(mb, scale=self.world / max(scored_global, 1), n_micro=len(micro))
            if not torch.isfinite(loss):
                latest = self.checkpoints.latest()
                kept = f"the last checkpoint ({latest}) holds the run before then" if latest else "no checkpoint was kept"
                raise TinyOnnError(
                    f"the loss became {loss.item()} at step {step}; stopped without saving a model ({kept}). Start again "
                    "with a lower --lr or --router-lr (--resume keeps a run's learning rates)"
                )
            self.accelerator.backward(loss)
            _, scored = scored_positions(mb["labels"])
            n = int(scored.sum())
            sums += torch.tensor([parts["ce"].item(), parts["kd"].item(), parts["lb"].item() / len(micro),
                                  parts["z"].item() / len(micro), parts["entropy"].item() * n, n,
                                  parts["rd"].item() / len(micro), parts["sp"].item() / len(micro),
                                  parts["ewc"].item() / len(micro), parts["hidden_kd"].item()], dtype=torch.float64)
            cats = mb["category"][:, 1:][scored].cpu()
            cat_tokens += torch.bincount(cats[cats >= 0], minlength=C).float()
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(cat_tokens)
        n_all = max(sums[5].item(), 1)
        losses = {"ce": sums[0].item() / n_all, "kd": sums[1].item() / n_all, "lb": sums[2].item() / self.world,
                  "z": sums[3].item() / self.world, "entropy": sums[4].item() / n_all, "rd": sums[6].item() / self.world,
                  "sp": sums[7].item() / self.world, "ewc": sums[8].item() / self.world,
                  "hidden_kd": sums[9].item() / n_all}
        return losses, cat_tokens

    def micro_batch_loss(self, mb: dict, scale: float, n_micro: int) -> tuple[torch.Tensor, dict]:
        """ce_weight·CE + kd·T²·KL (token sums × `scale`: after DDP's averaging, the step's global token mean) +
        (α_lb·load balance + z_loss_coef·z + router_distill·RD + specificity·SP + EWC) / micro-batches. Also returns
        each part (0-d tensors) for logging."""
        cfg = self.cfg
        zero = torch.zeros(())
        moe_kwargs = {"output_router_logits": True} if self.is_moe else {}
        outputs = self.ddp_model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False,
                                 **moe_kwargs)
        ce, entropy = response_ce_sum(outputs.logits, mb["labels"])
        loss = cfg.ce_weight * ce * scale
        kd = hkd = zero
        if self.teacher is not None and (cfg.kd or cfg.router_distill or cfg.hidden_kd):
            with torch.no_grad():  # (its FFN hooks compute the expert gains router distillation needs)
                t_logits = self.teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            if cfg.kd:
                kd = kd_sum(outputs.logits, t_logits, mb["labels"], cfg.kd_temperature)
                loss = loss + cfg.kd * kd * scale
            if cfg.hidden_kd:
                student_taps, teacher_taps = self.layer_taps
                hkd = hidden_distill_sum(student_taps.states(), teacher_taps.states(), mb["labels"])
                student_taps.clear()  # let the graph go with this micro-batch
                teacher_taps.clear()
                loss = loss + cfg.hidden_kd * hkd * scale
        lb = outputs.aux_loss if self.is_moe else zero
        z = outputs.router_z_loss if self.is_moe and cfg.z_loss_coef else zero
        rd, sp = self.routing_losses(mb)
        ewc = self.ewc.penalty() if self.ewc is not None else zero
        loss = loss + (cfg.aux_loss_coef * lb + cfg.z_loss_coef * z + cfg.router_distill * rd + cfg.specificity * sp
                       + ewc) / n_micro
        return loss, {"ce": ce, "kd": kd, "lb": lb, "z": z, "entropy": entropy, "rd": rd, "sp": sp, "ewc": ewc,
                      "hidden_kd": hkd}

    def routing_losses(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Router distillation and specificity, each averaged over layers, on the non-padding tokens of the micro-batch
        just forwarded; both re-route the routers' inputs detached, so only the routers learn from them."""
        zero = torch.zeros(())
        if self.router_taps is None:
            return zero, zero
        keep_N = mb["attention_mask"].reshape(-1).bool()
        cat_N = mb["category"].reshape(-1)[keep_N]
        C = self.state.category_mass.numel()
        rd, sp = [], []
        for li in range(len(self.router_taps.routers)):
            logp_NE = self.router_taps.log_probs(li)[keep_N.to(self.accelerator.device)]
            if self.cfg.router_distill:
                gains_NE = self.teacher_gains.gains[li][keep_N.to(self.teacher_gains.gains[li].device)]
                rd.append(router_distill_kl(logp_NE, gains_NE.to(logp_NE.device)))
            if self.cfg.specificity:
                sp.append(specificity_loss(logp_NE.exp(), cat_N.to(logp_NE.device), C))
        return (torch.stack(rd).mean() if rd else zero), (torch.stack(sp).mean() if sp else zero)

    def mask_experts(self, share: torch.Tensor) -> list[int]:
        """Set this step's update mask of every MoE layer by the policy; count updates per category. Returns the number
        of experts updated per layer (empty when no experts train)."""
        cfg, state = self.cfg, self.state
        if not self.experts or not cfg.train_experts:
            return []
        k = max(1, round(self.k * (1 - state.pi))) if state.phase == 2 and cfg.adaptive_k else self.k
        updated = []
        for li, ex in enumerate(self.experts):
            act_sum = distributed.all_reduce_sum(ex.output_norm_sum.clone())
            count = distributed.all_reduce_sum(ex.routed_count.clone())
            act_E = act_sum / count.clamp_min(1)
            if cfg.pi_schedule:  # min_k = f(PI, act_k), act_k = the experts that computed in this layer this step
                k = pi_schedule(state.pi, int((count > 0).sum()), cfg.pi_lr_floor)[1]
            mask = update_mask(cfg.policy, expert_grad_norms(ex).to(act_E.device), act_E, count > 0, k, cfg.only_routed)
            self.optimizer.set_update_mask(ex.gate_up_proj, mask)
            self.optimizer.set_update_mask(ex.down_proj, mask)
            updated.append(int(mask.sum()))
            state.update_counts[li] += mask.float().cpu()[:, None] * share[None, :]
        return updated

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out perplexity on response tokens (the model goes back to training mode)."""
        result = perplexity(self.model, self.held)
        self.model.train()
        return result

    # ---- checkpoint / resume -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        meta = {"model_fingerprint": self.fingerprint, "config": config_to_dict(self.cfg),
                "data_identity": data_identity(self.cfg.data)}
        extra = self.ewc.state_tensors() if self.ewc is not None else None
        return self.checkpoints.save(self.model, self.optimizer, self.state, meta, extra)

    def resume(self) -> TrainState:
        """Restore the latest checkpoint: weights, optimizer, RNGs and the TrainState."""
        latest = self.checkpoints.latest()
        if latest is None:
            raise TinyOnnError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        meta, counters = Checkpoints.load(latest, self.model, self.optimizer, self.fingerprint)
        check_resume_matches(meta, self.cfg, latest)
        state = self.fresh_state()
        state.step, state.history, state.ppl_before = meta["step"], meta["history"], meta.get("ppl_before")
        # a checkpoint from before the warm-up was saved ran the uncut --warmup-steps
        state.warmup = meta.get("warmup", self.cfg.warmup_steps)
        state.anneal_steps = meta.get("anneal_steps", state.anneal_steps)
        if "phase" not in meta:  # a checkpoint from before the counters and PI were saved
            log.warning("checkpoint %s predates saved update counters and PI: update rates cover the resumed steps only",
                        latest)
            state.phase = 1 if state.step < self.cfg.phase1_steps else 2
            return state
        if counters["update_counts"].shape != state.update_counts.shape:
            raise TinyOnnError(f"checkpoint {latest} counted updates over other data categories "
                               f"({tuple(counters['update_counts'].shape)} vs {tuple(state.update_counts.shape)}): "
                               "resume with the same --data, or use another --out")
        state.phase, state.pi = meta["phase"], meta["pi"]
        state.update_counts, state.category_mass = counters["update_counts"], counters["category_mass"]
        return state

    # ---- the loop and the end ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train from the current step to cfg.steps, checkpointing as configured; then write the outputs. A run that
        stops (an error or an interrupt) with nothing to resume from (no checkpoint) leaves nothing behind: the
        TensorBoard log it started is removed, and the --out folder it made, once empty."""
        try:
            return self._fit()
        except BaseException:  # a tool error, a crash or an interrupt: what it leaves must be resumable or nothing
            if self.rank == 0 and self.checkpoints.latest() is None:
                if self.writer is not None:
                    self.writer.close()
                if self.made_tb:
                    shutil.rmtree(self.out / "tb", ignore_errors=True)
                if self.made_out and self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()
            raise

    def _fit(self) -> Path:
        cfg = self.cfg
        bar = tqdm(range(self.state.step, cfg.steps), desc="train", disable=self.rank != 0, dynamic_ncols=True,
                   initial=self.state.step, total=cfg.steps)
        for step in bar:
            rec = self.train_step(step)
            self.state.history.append(rec)
            self.state.step = step + 1
            if rec.get("skipped"):
                bar.set_postfix(skipped="no response tokens", PI=f"{rec['pi']:.3f}", lr=f"{rec['lr']:.1e}")
            else:
                bar.set_postfix(loss=f"{rec['ce']:.3f}", PI=f"{rec['pi']:.3f}", lr=f"{rec['lr']:.1e}",
                                tok_s=f"{rec['tokens_per_second']:.0f}")
            if self.writer is not None and (step + 1) % cfg.log_every == 0:
                for key in (*STEP_METRICS, "pi", "lr", *(["top_k"] if cfg.top_k_start else [])):
                    if rec.get(key) is not None:  # a skipped step has no metrics
                        self.writer.add_scalar(f"train/{key}", rec[key], step + 1)
            # the last step too, once some step trained (a run that trained none fails and leaves nothing)
            last = step + 1 == cfg.steps and any(not h.get("skipped") for h in self.state.history)
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or last) and self.rank == 0:
                self.save_checkpoint()
            distributed.barrier()
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        """Write the trained model folder and train.json (rank 0)."""
        if self.writer is not None:
            self.writer.close()
        self.model.eval()
        if self.is_moe:
            self.model.track_expert_stats(False)
            self.model.set_routing(mode="sparse")
            if self.state.phase == 2 and self.cfg.top_p:  # the saved model routes as it was trained
                self.model.config.router_top_p = self.cfg.top_p
        if self.rank == 0:
            report = self.report()
            check_some_step_trained(report, self.cfg)
            check_not_diverged(self.model, report, self.cfg)
            with atomic_dir(self.out / "model", TRAIN_META) as tmp:
                self._save_model_folder(tmp, report)
            write_json(self.out / TRAIN_META, report)
        distributed.barrier()
        return self.out

    def report(self) -> dict:
        history = self.state.history
        trained = [h for h in history if not h.get("skipped")]
        report = {
            "format": "tiny_onn.train/1",
            "config": config_to_dict(self.cfg),
            "versions": versions(),
            "categories": self.data.category_names,
            "history": history,
            "final": trained[-1] if trained else None,  # the last step that updated the model
            "steps_skipped": len(history) - len(trained),
            "step_seconds_median": sorted(h["step_seconds"] for h in history)[len(history) // 2] if history else None,
        }
        if self.is_moe:
            # [layers, E, C] update rate per category
            rate = self.state.update_counts / self.state.category_mass.clamp_min(1e-9)[None, None, :]
            shared = [[e for e in range(rate.shape[1]) if bool((rate[li, e] >= 0.5).all())] for li in range(rate.shape[0])]
            report["update_rate_per_category"] = rate.tolist()
            report["emergent_shared_experts"] = {
                "rule": "updated in at least half of the steps' token mass of every category",
                "per_layer": shared, "count": sum(len(s) for s in shared)}
        if self.held is not None:
            report["perplexity"] = {"before": self.state.ppl_before, "after": perplexity(self.model, self.held)}
        return report

    def _save_model_folder(self, folder: Path, report: dict) -> None:
        card = _card(self.cfg, report, self.is_moe)
        src = Path(self.cfg.model)
        provenance = read_json(src / "provenance.json", "provenance") if (src / "provenance.json").is_file() else {}
        if not self.is_moe:  # a dense control: a plain Hugging Face folder (with a width-pruned model's provenance)
            self.model.save_pretrained(folder)
            self.source.tokenizer.save_pretrained(folder)
            if provenance:
                write_json(folder / "provenance.json", provenance)
            write_json(folder / TRAIN_META, report)
            (folder / "README.md").write_text(card)
            return
        carve_meta = read_carve_metadata(src)
        metadata = {**({CARVE_META: carve_meta} if carve_meta is not None else {}), TRAIN_META: report}
        save_model_folder(self.model, self.source.tokenizer, folder, provenance, metadata, card)


def check_some_step_trained(report: dict, cfg: TrainConfig) -> None:
    """One clear error instead of a model folder identical to the input: every step was skipped, because no
    micro-batch held a token to learn (a response token, or any token of a plain-text record)."""
    if report["final"] is None:
        raise TinyOnnError(f"no step trained: all {report['steps_skipped']} step(s) were skipped, because no batch held "
                           f"a token to learn at --seq-len {cfg.seq_len} (responses start after the prompt, and a "
                           "sequence shorter than the prompt scores nothing); no model was written. Raise --seq-len or "
                           "--batch-size, or give data with more response tokens")


def check_not_diverged(model: torch.nn.Module, report: dict, cfg: TrainConfig) -> None:
    """One clear error instead of a trained model folder when training diverged: a weight is no longer finite, or the
    held-out perplexity after training is (the training loss can stay finite while the weights blow up)."""
    after = (report.get("perplexity") or {}).get("after") or {}
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken is None and math.isfinite(after.get("ppl", 0.0)):
        return
    what = f"weight {broken} is not finite" if broken else f"held-out perplexity after training is {after['ppl']}"
    raise TinyOnnError(f"training diverged ({what}); no model was written. Lower --lr (it was {cfg.lr:g}) or "
                       "--router-lr")


# options a resumed run may change: where and how often it writes, on what device, and how far it goes
RESUMABLE_CHANGES = ("steps", "resume", "out", "device", "checkpoint_every", "log_every")


def check_resume_matches(meta: dict, cfg: TrainConfig, checkpoint: Path) -> None:
    """One clear error when `--resume` would continue a checkpoint under other settings (the run's record would no
    longer describe its history) or past its last step already (nothing left to train)."""
    saved = meta.get("config")
    if saved is not None:
        now = config_to_dict(cfg)

        def same(key: str) -> bool:
            a, b = saved[key], now[key]
            if key in ("model", "teacher") and a and b:
                return same_location(a, b)
            if key in ("data", "replay_data", "ewc_data") and isinstance(a, str) and isinstance(b, str):
                return same_data_spec(a, b)
            return a == b

        changed = [k for k in now if k not in RESUMABLE_CHANGES and k in saved and not same(k)]
        if changed:
            shown = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise TinyOnnError(f"--resume would continue checkpoint {checkpoint} with other settings ({shown}); give "
                               "the run's own settings (its train options are in the checkpoint's state.json), or "
                               "start a new run with another --out")
    if meta.get("data_identity") not in (None, data_identity(cfg.data)):
        raise TinyOnnError(f"--resume: the examples of --data {cfg.data!r} are not those checkpoint {checkpoint} was "
                           "trained on (a file edited in place?), so the run would continue from a position in other "
                           "data; restore the data, or start a new run with another --out")
    if meta["step"] >= cfg.steps:
        raise TinyOnnError(f"--resume: checkpoint {checkpoint} is at step {meta['step']}, so --steps {cfg.steps} leaves "
                           "nothing to train; give a larger --steps to continue the run")


# what a training run writes into its --out (and the temporary names its atomic writes use while they run)
TRAIN_OUT_ENTRIES = ("checkpoints", "tb", "model", TRAIN_META)
TRAIN_OUT_TEMPORARY = (".model.", f".{TRAIN_META}.")


def check_train_out(cfg: TrainConfig) -> None:
    """One clear error, before any work, when the run's `--out` cannot take its outputs: it is a file or lies under
    one, the working folder, or a folder of other things than a training run's; or its `model` folder would replace
    something that is not an earlier trained model (marked by its train.json), such as the model being trained or the
    teacher."""
    out = check_output_folder(cfg.out)
    cwd = Path.cwd().absolute()
    if out == cwd or out in cwd.parents:
        raise TinyOnnError(f"--out {cfg.out} is the working folder or one above it; give a new folder, e.g. "
                           "--out runs/train")
    if out.is_dir():
        others = sorted(e.name for e in out.iterdir()
                        if e.name not in TRAIN_OUT_ENTRIES and not e.name.startswith(TRAIN_OUT_TEMPORARY))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise TinyOnnError(f"--out {cfg.out} already holds other things than a training run's outputs ({shown}); "
                               "give a new or empty folder")
    model_out = check_replaceable(out / "model", TRAIN_META)
    for option, given in (("--model", cfg.model), ("--teacher", cfg.teacher)):
        path = Path(given).expanduser() if given else None
        if path is not None and path.is_dir() and path.resolve() == model_out.resolve():
            raise TinyOnnError(f"--out {cfg.out} would write the trained model over the {option} model ({given}); "
                               "give another --out")


def run(cfg: TrainConfig) -> Path:
    """Train `cfg.model` and write checkpoints, TensorBoard logs, the trained folder and train.json to `cfg.out`."""
    return Trainer(cfg).fit()


def _card(cfg: TrainConfig, report: dict, is_moe: bool) -> str:
    kind = "TinyOnn MoE" if is_moe else "Dense model"
    tags = "[tiny-onn, mixture-of-experts]" if is_moe else "[tiny-onn]"
    lines = ["---", "library_name: transformers", f"tags: {tags}", "---", "",
             f"# {kind} trained from {cfg.model}", "",
             f"Policy `{cfg.policy}`, {cfg.steps} steps, lr {cfg.lr}, router lr {cfg.router_lr}, CE weight {cfg.ce_weight}, "
             f"KD {cfg.kd if cfg.teacher else 0} (teacher {cfg.teacher or 'none'}), data `{cfg.data}`.", ""]
    if "perplexity" in report and report["perplexity"]["before"]:
        p = report["perplexity"]
        lines.append(f"Held-out perplexity: {p['before']['ppl']:.2f} before, {p['after']['ppl']:.2f} after training.")
    remote = ", trust_remote_code=True" if is_moe else ""
    lines += ["", f"Load with `AutoModelForCausalLM.from_pretrained(folder{remote})`; `{TRAIN_META}` is the training report.",
              ""]
    return "\n".join(lines)


def summary(cfg: TrainConfig, out: Path) -> str:
    out = Path(out)
    report = json.loads((out / TRAIN_META).read_text())
    line = f"trained model written to {out / 'model'} (log: {out / TRAIN_META}, TensorBoard: {out / 'tb'})"
    if "perplexity" in report and report["perplexity"]["before"]:
        p = report["perplexity"]
        line += f"\nheld-out perplexity: before {p['before']['ppl']:.2f}, after {p['after']['ppl']:.2f}"
    return line
