"""Give a carved MoE other routers: the same experts and weights, routers of another scorer (linear / Gaussian) or input
(FFN input / token embedding / running context), calibrated as the carve calibrates them. Lets a comparison start from
one carve instead of carving twice (the clustering would be the same)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_onn.artifacts import atomic_dir, check_replaceable, read_json
from tiny_onn.carve.calibrate import collect_ffn_inputs, collect_router_inputs, fit_routers
from tiny_onn.carve.carver import model_card
from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.errors import TinyOnnError
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM
from tiny_onn.model.configuration_tiny_onn import ACTIVATION_SCORES
from tiny_onn.model.export import CARVE_META, read_carve_metadata, save_model_folder
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.sources.loading import recorded_model


def reroute(moe: str | Path, out: str | Path, router_score: str = "linear", router_input: str = "ffn",
            calib_tokens: int = 8192, calib_steps: int = 60, calib_refine: str = "lbfgs", data: str = "",
            device: str = "cpu") -> Path:
    """Write to `out` a copy of the carved MoE folder `moe` whose routers score with `router_score` and read
    `router_input`, fitted (`fit_routers`) on `calib_tokens` training tokens of `data` (default: the carve's data, else
    the default mix) with the dense source named in the folder's provenance."""
    moe = Path(moe)
    check_replaceable(out, CARVE_META)
    carve_meta = read_carve_metadata(moe)
    if carve_meta is None or not (moe / "provenance.json").is_file():
        raise TinyOnnError(f"{moe} is not a carved TinyOnn folder (no carve.json / provenance.json)")
    provenance = read_json(moe / "provenance.json", "provenance")
    carved = load_source(SourceArgs(model=str(moe), device=device, dtype="fp32"), dense_only=False)
    dense = load_source(SourceArgs(model=recorded_model(provenance, "source_model"), device=device, dtype="fp32"))
    changes = {"router_score": router_score, "router_input": router_input}
    if router_score in ACTIVATION_SCORES:  # one flat scorer over the neurons' activations: groups play no part
        changes["router_type"] = "flat"
    if router_score != "gate":  # a second, exact stage exists for gate routers only
        changes["router_candidates"] = 0
    try:
        config = TinyOnnConfig(**{**carved.model.config.to_dict(), **changes})
    except ValueError as err:
        raise TinyOnnError(f"cannot reroute {moe} to {router_score!r} routers reading {router_input!r}: {err}") from err
    model = TinyOnnForCausalLM(config).to(device).eval()
    state = {k: v for k, v in carved.model.state_dict().items() if ".mlp.router." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp.router." in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    cfg = carve_meta.get("config", {})
    args = DataArgs(data=data or cfg.get("data") or "default", seq_len=cfg.get("seq_len", 256), seed=cfg.get("seed", 0))
    calib = build_dataset(dense.tokenizer, args, "train", max_tokens=calib_tokens)
    with torch.no_grad():
        report = fit_routers(model, collect_ffn_inputs(dense.model, calib), collect_router_inputs(model, calib),
                             refine_steps=calib_steps, refine=calib_refine)
    meta = {**carve_meta, "config": {**cfg, **changes},
            "calibration": report,
            "rerouted_from": {"folder": str(moe), "calib_tokens": calib_tokens, "calib_steps": calib_steps,
                              "calib_refine": calib_refine, "data": args.data}}
    with atomic_dir(out, CARVE_META) as tmp:
        save_model_folder(model, carved.tokenizer, tmp, provenance, {CARVE_META: meta}, model_card(model, dense, meta))
    return Path(out)
