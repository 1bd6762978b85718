"""Train stage: continued training of a carved MoE with expert-masked updates (full / SMK / SMK²), distillation from the
dense source, and the two-phase schedule. Runs on accelerate, so 1 CPU, 1 GPU or DDP use the same loop.

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
from tiny_onn.artifacts import atomic_dir, read_json, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data import IGNORE_INDEX, DataArgs, PackedData, build_dataset
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval import perplexity
from tiny_onn.model.export import save_model_folder
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.train.losses import kd_sum, performance_index, response_ce_sum, router_z_loss
from tiny_onn.train.optim import MaskedAdamW
from tiny_onn.train.policies import POLICIES, expert_grad_norms, update_mask

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(SourceArgs, DataArgs):
    """Continue training a carved TinyOnn MoE."""

    model: str = "runs/demo/moe"
    """The MoE folder to train (from `tiny-onn carve`)."""
    teacher: str = ""
    """Dense teacher for distillation ('smollm2', a .gguf, a folder); empty = no distillation."""
    kd: float = 0.0
    """Weight α_kd of the distillation loss α·T²·KL(teacher ‖ student)."""
    kd_temperature: float = 2.0
    """Distillation temperature T."""
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
    """Gradient-norm clipping (0 = off)."""
    aux_loss_coef: float = 0.01
    """Weight α_lb of the Switch load-balancing loss."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss."""
    train_experts: bool = True
    """Train the routed experts."""
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
    eval_tokens: int = 4096
    """Held-out tokens for perplexity before and after training (0 = skip)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
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
        for name in ("steps", "batch_size", "grad_accum", "max_k", "min_k"):
            if getattr(self, name) < 1:
                raise TinyOnnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kd < 0 or (self.kd > 0 and not self.teacher):
            raise TinyOnnError("--kd needs a --teacher (and must be non-negative)")
        if self.kd_temperature <= 0:
            raise TinyOnnError("kd_temperature must be positive")
        if self.lr <= 0 or self.router_lr <= 0:
            raise TinyOnnError("learning rates must be positive")


def _set_trainable(model, cfg: TrainConfig) -> None:
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.requires_grad_(cfg.train_experts)
        elif ".mlp.shared_expert." in name:
            p.requires_grad_(cfg.train_shared)
        elif ".mlp.router." in name:
            p.requires_grad_(cfg.train_routers)
        elif "embed_tokens" in name or "lm_head" in name:
            p.requires_grad_(cfg.train_embeddings)
        else:
            p.requires_grad_(cfg.train_attention)


def model_fingerprint(model) -> str:
    """Parameter names and shapes: a checkpoint must come from a model with the same layout."""
    text = json.dumps([(n, list(p.shape)) for n, p in model.named_parameters()])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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

    def save(self, step: int, model, optimizer, rng: dict, meta: dict) -> Path:
        name = f"step-{step:06d}"
        with atomic_dir(self.root / name) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
            write_json(tmp / "state.json", {**meta, "step": step, "python_rng": rng["python"]})
        write_json(self.root / "latest.json", {"folder": name, "step": step})
        for old in sorted(self.root.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return self.root / name

    @staticmethod
    def load(folder: Path, model, optimizer, fingerprint: str) -> dict:
        state = read_json(folder / "state.json", "checkpoint state")
        if state.get("model_fingerprint") != fingerprint:
            raise TinyOnnError(
                f"checkpoint {folder} was made for a different model (layout {state.get('model_fingerprint')} vs "
                f"{fingerprint}); use another --out or drop --resume"
            )
        load_model(model, str(folder / "model.safetensors"))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        torch.set_rng_state(load_file(folder / "rng.safetensors")["torch_rng"])
        random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]), state["python_rng"][2]))
        return state


def step_batches(data: PackedData, step: int, cfg: TrainConfig, rank: int, world: int) -> tuple[list[dict], int]:
    """This rank's micro-batches of global step `step` (the data cycles), and the step's global count of scored tokens."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    rows = torch.arange(step * per_step, (step + 1) * per_step) % len(data)
    scored = int((data.labels[rows][:, 1:] != IGNORE_INDEX).sum())
    micro = []
    for m in range(cfg.grad_accum):
        start = (m * world + rank) * cfg.batch_size
        r = rows[start : start + cfg.batch_size]
        micro.append({k: getattr(data, k)[r] for k in ("input_ids", "labels", "attention_mask", "category")})
    return micro, scored


def run(cfg: TrainConfig) -> Path:
    """Train `cfg.model` and write checkpoints, TensorBoard logs, the trained folder and train.json to `cfg.out`."""
    from accelerate import Accelerator

    rank, world = distributed.init_from_env()
    cfg.device = distributed.local_device(cfg.device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    src_args = SourceArgs(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SourceArgs)})
    student = load_source(src_args, dense_only=False)
    model = student.model
    if model.config.model_type != "tiny_onn":
        raise TinyOnnError(f"{cfg.model!r} is not a TinyOnn MoE; carve one first (`tiny-onn carve`)")
    E = model.config.num_experts
    k = cfg.max_k if cfg.policy == "smk2" else cfg.min_k
    if cfg.policy != "full" and k > E:
        raise TinyOnnError(f"{'max_k' if cfg.policy == 'smk2' else 'min_k'} ({k}) is larger than the model's {E} experts")
    teacher = None
    if cfg.teacher:
        teacher = load_source(dataclasses.replace(src_args, model=cfg.teacher, load_in_4bit=cfg.load_in_4bit)).model
        if teacher.config.vocab_size != model.config.vocab_size:
            raise TinyOnnError("the teacher's vocabulary differs from the student's: distillation needs the same tokenizer")
        teacher.requires_grad_(False)

    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu",
                              mixed_precision="bf16" if torch.cuda.is_available() and cfg.dtype != "fp32" else "no")
    _set_trainable(model, cfg)
    model.train()
    experts = [layer.mlp.experts for layer in model.model.layers]
    for ex in experts:
        ex.track_stats = True
    router_params = [p for n, p in model.named_parameters() if ".mlp.router." in n and p.requires_grad]
    other_params = [p for n, p in model.named_parameters() if ".mlp.router." not in n and p.requires_grad]
    groups = [g for g in ({"params": other_params, "lr": cfg.lr}, {"params": router_params, "lr": cfg.router_lr})
              if g["params"]]
    if not groups:
        raise TinyOnnError("nothing to train: every --train-* switch is off")
    optimizer = MaskedAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    fingerprint = model_fingerprint(model)
    ckpts = Checkpoints(out)
    start_step, history, ppl_before = 0, [], None
    if cfg.resume:
        latest = ckpts.latest()
        if latest is None:
            raise TinyOnnError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        state = Checkpoints.load(latest, model, optimizer, fingerprint)
        start_step, history, ppl_before = state["step"], state["history"], state.get("ppl_before")
    elif ckpts.latest() is not None:
        raise TinyOnnError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    ddp_model = accelerator.prepare(model)

    global_rows = cfg.steps * cfg.batch_size * cfg.grad_accum * world
    data = build_dataset(student.tokenizer, cfg, "train", max_tokens=global_rows * cfg.seq_len)
    held = build_dataset(student.tokenizer, cfg, "heldout", max_tokens=cfg.eval_tokens) if cfg.eval_tokens else None
    if held is not None and ppl_before is None:
        ppl_before = perplexity(model, held)
        model.train()
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    C = len(data.category_names)
    update_counts = torch.zeros(len(experts), E, C)  # [layers, E, categories]
    category_mass = torch.zeros(C)
    phase = 1 if start_step < cfg.phase1_steps else 2
    bar = tqdm(range(start_step, cfg.steps), desc="train", disable=rank != 0, dynamic_ncols=True, initial=start_step,
               total=cfg.steps)
    pi = 0.0
    for step in bar:
        t0 = time.perf_counter()
        if phase == 1 and (step >= cfg.phase1_steps or (cfg.phase2_pi and pi >= cfg.phase2_pi)):
            phase = 2
        model.config.moe_mode = "dense_mixture" if phase == 1 else "sparse"
        if phase == 2 and cfg.top_p:
            model.config.router_top_p = cfg.top_p
        for i, g in enumerate(optimizer.param_groups):
            g["lr"] = base_lrs[i] * lr_lambda(step, cfg.warmup_steps, cfg.steps)
        for ex in experts:
            ex.reset_stats()
        micro, scored_global = step_batches(data, step, cfg, rank, world)
        sums = torch.zeros(5, dtype=torch.float64)  # ce, kd, lb, z, entropy·n
        n_local = 0
        cat_tokens = torch.zeros(C)
        for mb in micro:
            mb = {k: v.to(accelerator.device) for k, v in mb.items()}
            with accelerator.autocast():
                outputs = ddp_model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                    output_router_logits=True, use_cache=False)
                ce, entropy = response_ce_sum(outputs.logits, mb["labels"])
                scale = world / max(scored_global, 1)  # DDP averages over ranks: this makes it the global token mean
                loss = ce * scale
                kd = torch.zeros(())
                if teacher is not None and cfg.kd:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                    kd = kd_sum(outputs.logits, t_logits, mb["labels"], cfg.kd_temperature)
                    loss = loss + cfg.kd * kd * scale
                lb = outputs.aux_loss
                z = router_z_loss(model) if cfg.z_loss_coef else torch.zeros(())
                loss = loss + (cfg.aux_loss_coef * lb + cfg.z_loss_coef * z) / len(micro)
            if not torch.isfinite(loss):
                last = ckpts.latest()
                raise TinyOnnError(
                    f"the loss became {loss.item()} at step {step}; stopped without saving. "
                    f"Last good checkpoint: {last or 'none'} (lower --lr or --router-lr, then --resume)"
                )
            accelerator.backward(loss)
            n = int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
            n_local += n
            sums += torch.tensor([ce.item(), kd.item(), lb.item() / len(micro), z.item() / len(micro), entropy.item() * n],
                                 dtype=torch.float64)
            valid = mb["labels"][:, 1:] != IGNORE_INDEX
            cats = mb["category"][:, 1:][valid].cpu()
            cat_tokens += torch.bincount(cats[cats >= 0], minlength=C).float()
        # global statistics (identical on every rank)
        stats = torch.cat([sums, torch.tensor([float(n_local)], dtype=torch.float64)])
        distributed.all_reduce_sum(stats)
        distributed.all_reduce_sum(cat_tokens)
        ce_mean = stats[0].item() / max(stats[5].item(), 1)
        kd_mean = stats[1].item() / max(stats[5].item(), 1)
        entropy_mean = stats[4].item() / max(stats[5].item(), 1)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
        pi = performance_index(ce_mean, entropy_mean, grad_norm, cfg.pi_alpha, cfg.pi_gamma)
        k_eff = k
        if phase == 2 and cfg.adaptive_k:
            k_eff = max(1, round(k * (1 - pi)))
        updated = []
        for li, ex in enumerate(experts):
            if not cfg.train_experts:
                break
            act_sum = distributed.all_reduce_sum(ex.output_norm_sum.clone())
            count = distributed.all_reduce_sum(ex.routed_count.clone())
            act_E = act_sum / count.clamp_min(1)
            mask = update_mask(cfg.policy, expert_grad_norms(ex).to(act_E.device), act_E, count > 0, k_eff,
                               cfg.only_routed)
            optimizer.set_update_mask(ex.gate_up_proj, mask)
            optimizer.set_update_mask(ex.down_proj, mask)
            updated.append(int(mask.sum()))
            update_counts[li] += mask.float().cpu()[:, None] * (cat_tokens / cat_tokens.sum().clamp_min(1))[None, :]
        category_mass += cat_tokens / cat_tokens.sum().clamp_min(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro)) * world
        rec = {"step": step + 1, "phase": phase, "ce": ce_mean, "kd": kd_mean, "lb": stats[2].item() / world,
               "z": stats[3].item() / world, "pi": pi, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
               "tokens_per_second": tokens / dt, "experts_updated_mean": sum(updated) / max(len(updated), 1),
               "step_seconds": dt}
        history.append(rec)
        bar.set_postfix(loss=f"{ce_mean:.3f}", PI=f"{pi:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{tokens / dt:.0f}")
        if writer is not None and (step + 1) % cfg.log_every == 0:
            for key in ("ce", "kd", "lb", "z", "pi", "grad_norm", "lr", "tokens_per_second", "experts_updated_mean"):
                writer.add_scalar(f"train/{key}", rec[key], step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and rank == 0:
            meta = {"model_fingerprint": fingerprint, "history": history, "ppl_before": ppl_before,
                    "config": config_to_dict(cfg)}
            ckpts.save(step + 1, model, optimizer, {"python": list(random.getstate())}, meta)
        distributed.barrier()
    bar.close()
    if writer is not None:
        writer.close()
    for ex in experts:
        ex.track_stats = False
    model.eval()
    model.config.moe_mode = "sparse"
    if rank == 0:
        report = _report(cfg, data, history, update_counts, category_mass, held, model, ppl_before)
        src_folder = Path(cfg.model)
        provenance = json.loads((src_folder / "provenance.json").read_text()) if (src_folder / "provenance.json").is_file() else {}
        with atomic_dir(out / "model") as tmp:
            save_model_folder(model, student.tokenizer, tmp, provenance, report, _card(cfg, report))
        write_json(out / "train.json", report)
    distributed.barrier()
    return out


def _report(cfg, data, history, update_counts, category_mass, held, model, ppl_before) -> dict:
    rate = update_counts / category_mass.clamp_min(1e-9)[None, None, :]  # [layers, E, C] update rate per category
    shared = [[e for e in range(rate.shape[1]) if bool((rate[li, e] >= 0.5).all())] for li in range(rate.shape[0])]
    report = {
        "format": "tiny_onn.train/1",
        "config": config_to_dict(cfg),
        "versions": versions(),
        "categories": data.category_names,
        "history": history,
        "final": history[-1] if history else None,
        "update_rate_per_category": rate.tolist(),
        "emergent_shared_experts": {"rule": "updated in at least half of the steps' token mass of every category",
                                    "per_layer": shared, "count": sum(len(s) for s in shared)},
        "step_seconds_median": sorted(h["step_seconds"] for h in history)[len(history) // 2] if history else None,
    }
    if held is not None:
        after = perplexity(model, held)
        report["perplexity"] = {"before": ppl_before, "after": after}
    return report


def _card(cfg: TrainConfig, report: dict) -> str:
    lines = ["---", "library_name: transformers", "tags: [tiny-onn, mixture-of-experts]", "---", "",
             f"# TinyOnn MoE trained from {cfg.model}", "",
             f"Policy `{cfg.policy}`, {cfg.steps} steps, lr {cfg.lr}, router lr {cfg.router_lr}, "
             f"KD {cfg.kd if cfg.teacher else 0} (teacher {cfg.teacher or 'none'}), data `{cfg.data}`.", ""]
    if "perplexity" in report and report["perplexity"]["before"]:
        p = report["perplexity"]
        lines.append(f"Held-out perplexity: {p['before']['ppl']:.2f} before, {p['after']['ppl']:.2f} after training.")
    lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.", ""]
    return "\n".join(lines)


def summary(cfg: TrainConfig, out: Path) -> str:
    report = json.loads((Path(out) / "train.json").read_text())
    line = f"trained model written to {Path(out) / 'model'} (log: {Path(out) / 'train.json'}, TensorBoard: {Path(out) / 'tb'})"
    if "perplexity" in report and report["perplexity"]["before"]:
        p = report["perplexity"]
        line += f"\nheld-out perplexity: before {p['before']['ppl']:.2f}, after {p['after']['ppl']:.2f}"
    return line
