"""Interpret stage: expert profiles, labels, embeddings, specialisation and the HTML dashboard of a TinyOnn MoE."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tiny_onn.artifacts import atomic_dir, check_replaceable, figure_text, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.errors import TinyOnnError
from tiny_onn.interpret.dashboard import render_dashboard
from tiny_onn.interpret.profiles import (
    auto_label,
    layer_nmi,
    mean_routing_weight,
    record_routing,
    selection_rate,
    snippets,
    token_log_odds,
)
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.sources.loading import check_device, warn_if_beyond_positions

log = logging.getLogger(__name__)


@dataclass
class InterpretConfig(DataArgs):
    """Profile, label and visualise the experts of a TinyOnn MoE."""

    model: str = "runs/demo/moe"
    """The MoE folder to interpret."""
    tokens: int = 8192
    """Tokens to route for the profiles (held-out split)."""
    top_tokens: int = 10
    """Tokens listed per expert."""
    device: str = "auto"
    """Device."""
    out: str = "runs/demo/report"
    """Output folder: dashboard.html, interpret.json, labels.json, PNGs."""

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        check_device(self.device)
        if self.tokens < 1:
            raise TinyOnnError(f"tokens must be positive, got {self.tokens}")
        if self.top_tokens < 1:
            raise TinyOnnError(f"top_tokens must be positive, got {self.top_tokens}")


def expert_embedding(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the experts: UMAP when there are enough of them, t-SNE otherwise."""
    n = features.shape[0]
    if n >= 8:
        # UMAP can fail on degenerate inputs (e.g. identical experts): fall through to t-SNE then
        with contextlib.suppress(ImportError, ValueError, TypeError):
            import umap
            from sklearn.metrics import pairwise_distances

            # the Euclidean distances precomputed in one vectorised call: below 4,096 points UMAP finds exact
            # neighbours through a pairwise loop over its own metric, point pair by point pair (minutes for 30 layers
            # of 1,344 one-neuron experts)
            distances = pairwise_distances(features.astype(np.float64))
            # 200 layout epochs (UMAP's own choice above 10,000 points; 500 below): a map to browse, 30 layers of it
            umap_ = umap.UMAP(n_neighbors=min(15, n - 1), metric="precomputed", n_epochs=200, random_state=seed,
                              n_jobs=1)
            with warnings.catch_warnings():
                # a precomputed metric only disables inverse_transform, which the map never uses
                warnings.filterwarnings("ignore", message="using precomputed metric")
                return umap_.fit_transform(distances), "UMAP"
    from sklearn.manifold import TSNE

    if n >= 4:
        return TSNE(random_state=seed, perplexity=max(1.0, min(30.0, (n - 1) / 3)), init="random").fit_transform(features), "t-SNE"
    return np.stack([np.arange(n), np.zeros(n)], axis=1).astype(float), "index"


def build_report(model, tokenizer, rec, cfg: InterpretConfig) -> tuple[dict, dict]:
    """(interpret.json content, dashboard data)."""
    rate = selection_rate(rec)  # [L, E, C]
    weight = mean_routing_weight(rec)
    nmi = layer_nmi(rec)
    decode = partial(token_text, tokenizer)
    decode_ids = tokenizer.decode
    layers, dash_layers, labels = [], [], []
    total = rec.tokens_per_category.sum().clamp_min(1)
    for li in range(rate.shape[0]):
        router_w = model.model.layers[li].mlp.router.expert_directions().detach().float().cpu().numpy()
        xy, how = expert_embedding(np.concatenate([router_w, rate[li].numpy()], axis=1), cfg.seed)
        experts, dash = [], []
        for e in range(rate.shape[1]):
            lab = auto_label(rec, li, e, decode)
            toks = [(decode(t), lo, n) for t, lo, n in token_log_odds(rec, li, e, cfg.top_tokens)]
            snip = snippets(rec, li, e, decode_ids)
            sel = float(rec.selected[li, e].sum() / total)
            experts.append({"expert": e, **lab, "selected_fraction": sel, "selection_rate": rate[li, e].tolist(),
                            "mean_routing_weight": weight[li, e].tolist(), "top_tokens": toks, "snippets": snip})
            dash.append({"dominant": lab["dominant_category"], "specificity": lab["specificity"], "selected": sel,
                         "rate": rate[li, e].tolist(), "xy": [float(xy[e, 0]), float(xy[e, 1])], "tokens": toks,
                         "snippets": snip})
        layers.append({"layer": li, "nmi": nmi[li], "embedding": how, "experts": experts})
        dash_layers.append({"nmi": nmi[li], "experts": dash})
        labels.append([x["label"] for x in experts])
    report = {"format": "tiny_onn.interpret/1", "model": cfg.model, "categories": rec.categories,
              "tokens": int(total), "nmi_per_layer": nmi, "layers": layers, "config": config_to_dict(cfg),
              "versions": versions()}
    dashboard = {"title": Path(cfg.model).name or cfg.model, "categories": rec.categories, "layers": dash_layers,
                 "labels": labels}
    return report, dashboard


def write_figures(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = report["categories"]
    nl = len(report["layers"])
    picks = sorted({0, nl // 2, nl - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.5), squeeze=False)
    for ax, li in zip(axes[0], picks, strict=True):
        m = np.array([x["selection_rate"] for x in report["layers"][li]["experts"]])  # [E, C]
        im = ax.imshow(m, aspect="auto", cmap="Reds")
        ax.set_xticks(range(len(cats)), [figure_text(c) for c in cats])
        ax.set_ylabel("expert")
        ax.set_title(f"layer {li}: selection rate")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(folder / "heatmap.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    nmi = report["nmi_per_layer"]
    if any(v is None for v in nmi):
        ax.text(0.5, 0.5, "NMI not measured: the tokens read come from one category", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.bar(range(nl), nmi)
    ax.set_xlabel("layer")
    ax.set_ylabel("NMI(top-1 expert, category)")
    fig.tight_layout()
    fig.savefig(folder / "nmi.png", dpi=110)
    plt.close(fig)


def token_text(tokenizer, token: int) -> str:
    """One token as text; a token that is only part of a character's bytes (it decodes to U+FFFD alone) is shown as
    its raw vocabulary entry instead, so that distinct tokens never read the same."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(token)
        return f"<{raw}>" if raw else text
    return text


def run(cfg: InterpretConfig) -> Path:
    check_replaceable(cfg.out, "interpret.json")
    source = load_source(SourceArgs(model=cfg.model, device=cfg.device), dense_only=False)
    if source.model.config.model_type != "tiny_onn":
        raise TinyOnnError(f"{cfg.model!r} is not a TinyOnn MoE; interpret needs a carved or trained MoE folder")
    warn_if_beyond_positions(source.model.config, cfg.seq_len, "--seq-len")
    data = build_dataset(source.tokenizer, cfg, "heldout", max_tokens=cfg.tokens)
    rec = record_routing(source.model, data, max_tokens=cfg.tokens)
    recorded = int(rec.tokens_per_category.sum())
    if recorded < cfg.tokens:
        log.warning("the held-out split of --data holds %d tokens, fewer than --tokens %d: all of them are recorded; "
                    "give more data (or a larger heldout_fraction) for the full budget", recorded, cfg.tokens)
    seen = [name for name, n in zip(rec.categories, rec.tokens_per_category.tolist(), strict=True) if n > 0]
    if len(seen) < 2:
        log.warning("the %d tokens read come from %s only: NMI(expert, category) needs two categories or more, so it "
                    "is not reported (null in interpret.json); choose data with several categories (--data, "
                    "--categories) to measure it", int(rec.tokens_per_category.sum()), " and ".join(seen) or "no category")
    report, dash = build_report(source.model, source.tokenizer, rec, cfg)
    with atomic_dir(cfg.out, "interpret.json") as tmp:
        write_json(tmp / "interpret.json", report)
        write_json(tmp / "labels.json", {"model": cfg.model, "labels": dash["labels"]})
        (tmp / "dashboard.html").write_text(render_dashboard(dash, report["layers"][0]["embedding"]), encoding="utf-8")
        write_figures(report, tmp)
    return Path(cfg.out)


def summary(cfg: InterpretConfig, out: Path) -> str:
    report = json.loads((Path(out) / "interpret.json").read_text())
    nmi = report["nmi_per_layer"]
    if any(v is None for v in nmi):
        return (f"dashboard: {Path(out) / 'dashboard.html'}\nNMI(expert, category): not measured (the tokens read "
                "come from one category)")
    return (f"dashboard: {Path(out) / 'dashboard.html'}\nNMI(expert, category) per layer: mean {np.mean(nmi):.3f}, "
            f"max {max(nmi):.3f} (layer {int(np.argmax(nmi))})")


