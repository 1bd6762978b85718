"""Write a TinyOnn MoE folder as a GGUF file that llama.cpp runs natively, with gguf-py (llama.cpp's own writer).

Which llama.cpp architecture computes our MoE exactly:
- Llama-family sources (no q/k norm) -> `deepseek` (v1): Llama attention (rope in adjacent pairs, so q/k rows are
  permuted as llama.cpp's converter does), routed weights = softmax over all experts, no renormalisation, x scale 1,
  plus ungated shared experts of n_shared x the routed expert width.
- Qwen3 sources (per-head q/k RMSNorm) -> `dots1`: Qwen3 attention (rope over half-dimensions, no permutation), the same
  shared-expert MoE with the gating function, renormalisation and scale set in the metadata (softmax, no, 1). dots1 loads
  one key/value head per query head, so grouped k/v heads are repeated (exact, as HF's repeat_kv; a larger KV cache).
Both equal `expert_weighting="probs"` with a flat router and fixed top-k. A shared expert whose width is not a multiple of
the routed expert width is zero-padded (silu(0)·0 = 0 adds nothing); a model without one gets one zero expert.

Legend: V vocabulary, D hidden size, E routed experts, I neurons per expert, S shared-expert neurons, H heads, h head dim.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tiny_onn.artifacts import check_folder_can_be_made, read_json, umask_mode
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources.loading import model_folder_hint, recorded_model

log = logging.getLogger(__name__)

QUANTS = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
# token embeddings (and the tied output layer) stay at 8 bits under a 4-bit quantisation, as in the bundled SmolLM2 Q4_1
_EMBED_QUANT = {"q4_0": "q8_0", "q4_1": "q8_0"}
_BPE_TOKEN_TYPES = {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL,
                    "user": gguf.TokenType.USER_DEFINED, "unused": gguf.TokenType.UNUSED}


@dataclass
class MoeFolder:
    """A TinyOnn MoE folder read for export: its config (a dict), weights (name -> float32 tensor) and provenance."""

    path: Path
    config: dict
    weights: dict[str, torch.Tensor]
    provenance: dict


def read_moe_folder(path: str | Path) -> MoeFolder:
    """Read config.json, the safetensors weights and provenance.json; refuse anything that is not a TinyOnn MoE."""
    path = Path(path)
    if path.is_file():
        raise TinyOnnError(f"{path} is a file; export reads a MoE folder (written by `tiny-onn carve` or `train`)"
                           + (" — a GGUF needs no export: run it in llama.cpp" if path.suffix == ".gguf" else ""))
    if not path.is_dir():
        raise TinyOnnError(f"model folder not found: {path} (give the folder written by `tiny-onn carve` or `train`)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TinyOnnError(f"{path} has no config.json: not a Hugging Face model folder{model_folder_hint(path)}")
    config = read_json(cfg_file, "model config")
    if config.get("model_type") != "tiny_onn":
        raise TinyOnnError(
            f"{path} is a dense '{config.get('model_type')}' model, not a carved TinyOnn MoE: export the folder written "
            "by `tiny-onn carve` or `train` (a dense model converts with llama.cpp's own convert_hf_to_gguf.py)"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TinyOnnError(f"{path} has no *.safetensors weights; re-run the stage that wrote it")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update({k: v.float() for k, v in load_file(f).items()})
        except (SafetensorError, OSError, ValueError) as e:
            raise TinyOnnError(f"{f} is corrupt or truncated ({e}); re-run the stage that wrote it") from e
    prov_file = path / "provenance.json"
    provenance = read_json(prov_file, "provenance") if prov_file.is_file() else {}
    return MoeFolder(path, config, weights, provenance)


def target_architecture(config: dict) -> str:
    """The llama.cpp architecture that computes this MoE exactly, or one TinyOnnError naming the option to change."""
    fixes = []
    if config.get("router_type", "flat") != "flat":
        fixes.append("its router is hierarchical (p_main(group) x p_sub(expert)), which no llama.cpp architecture "
                     "computes: carve with --router flat")
    if config.get("expert_weighting", "straight_through") != "probs":
        fixes.append("its selected experts are summed with weight 1 (expert_weighting=straight_through), which no "
                     "llama.cpp architecture computes: carve with --expert-weighting probs, then train")
    if config.get("router_score", "linear") != "linear":
        fixes.append(f"its routers score experts with {config['router_score']!r} (llama.cpp's gate is one linear map): "
                     "carve with --router-score linear")
    if config.get("router_input", "ffn") != "ffn":
        fixes.append(f"its routers read {config['router_input']!r}, llama.cpp's read the FFN input: carve with "
                     "--router-input ffn")
    if config.get("router_top_p", 0.0) > 0:
        fixes.append(f"it routes by top-p ({config['router_top_p']}), llama.cpp by a fixed top-k: carve or train "
                     "with --top-p 0")
    if config.get("moe_output_bias"):
        fixes.append("its MoE blocks add an output bias, which llama.cpp's MoE FFNs do not: carve without "
                     "--output-bias")
    if config.get("moe_mode", "sparse") != "sparse":
        fixes.append(f"its moe_mode is {config.get('moe_mode')!r}: export a model saved in sparse mode")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        fixes.append(f"its activation is {config.get('hidden_act')!r}; llama.cpp's MoE FFNs use SiLU")
    if config.get("attention_bias") or config.get("attention_out_bias"):
        fixes.append("its attention projections have biases (Qwen2-style), which the target architectures do not load")
    if config.get("sliding_window"):
        fixes.append(f"its attention keeps a sliding window of {config['sliding_window']} tokens (Mistral-style), which "
                     "the target architectures do not apply")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        fixes.append(f"its rope scaling {rope.get('rope_type')!r} is not exported (only plain rope)")
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    if not config.get("use_qk_norm") and heads * head_dim != config["hidden_size"]:
        fixes.append(f"llama.cpp's deepseek architecture (the target of sources without q/k norms) needs heads x "
                     f"head_dim = hidden size, got {heads} x {head_dim} != {config['hidden_size']}: a limit of the "
                     "source, which no carve option changes")
    if fixes:
        raise TinyOnnError("this MoE cannot be exported to GGUF: " + "; ".join(fixes))
    return "dots1" if config.get("use_qk_norm") else "deepseek"


def permute_for_rope_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows rotate (i, i + h/2) pairs; llama.cpp's Llama-style rope rotates (2i, 2i + 1): reorder each head."""
    rows, D = w.shape
    h = rows // n_head
    return w.view(n_head, 2, h // 2, D).transpose(1, 2).reshape(rows, D)  # [H*h, D], pairs now adjacent


def repeat_kv_heads(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """k/v projection rows of `n_head_kv` heads repeated so that query head j reads kv head j // (n_head / n_head_kv)."""
    rows, D = w.shape
    h = rows // n_head_kv
    return w.view(n_head_kv, 1, h, D).expand(n_head_kv, n_head // n_head_kv, h, D).reshape(n_head * h, D)


def kv_heads_in_file(config: dict, arch: str) -> int:
    return config["num_attention_heads"] if arch == "dots1" else config["num_key_value_heads"]


def _encode(name: str, w: torch.Tensor, quant: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One tensor in the requested type; 1-D tensors and rows that do not fit the block size fall back to F32 / F16."""
    arr = w.detach().float().contiguous().numpy()
    if arr.ndim == 1 or quant == "f32":
        return arr, gguf.GGMLQuantizationType.F32
    qtype = QUANTS[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        log.info("%s: rows of %d do not fit %s blocks of %d; written as f16", name, arr.shape[-1], quant, block)
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16), qtype
    return gguf.quants.quantize(arr, qtype), qtype


class _TensorWriter:
    """Adds tensors to a GGUFWriter under llama.cpp's names, quantising as asked; counts bytes per type."""

    def __init__(self, writer: gguf.GGUFWriter, arch: str, quant: str):
        self.writer = writer
        self.names = gguf.TENSOR_NAMES
        self.arch_tensors = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]])
        self.quant = quant
        self.types: dict[str, int] = {}

    def add(self, tensor: gguf.MODEL_TENSOR, w: torch.Tensor, bid: int | None = None, quant: str | None = None,
            suffix: str = "weight") -> None:
        assert tensor in self.arch_tensors, tensor
        name = self.names[tensor].format(bid=bid) + "." + suffix
        data, qtype = _encode(name, w, quant or self.quant)
        raw = None if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype
        self.writer.add_tensor(name, data, raw_dtype=raw)
        self.types[qtype.name] = self.types.get(qtype.name, 0) + 1


def _shared_width(config: dict) -> tuple[int, int]:
    """(number of llama.cpp shared experts, padded width): the shared expert is n_shared x the routed expert width."""
    inter, shared = config["moe_intermediate_size"], config.get("shared_expert_intermediate_size", 0)
    n_shared = max(1, math.ceil(shared / inter))
    return n_shared, n_shared * inter


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if w.shape[0] < rows else w


def write_tensors(tw: _TensorWriter, moe: MoeFolder, arch: str) -> None:
    """Every weight of the MoE under llama.cpp's tensor names, in the layout its graph for `arch` expects."""
    c, W, T = moe.config, moe.weights, gguf.MODEL_TENSOR
    embed_quant = _EMBED_QUANT.get(tw.quant, tw.quant)
    tied = c.get("tie_word_embeddings", False) or "lm_head.weight" not in W
    tw.add(T.TOKEN_EMBD, W["model.embed_tokens.weight"], quant=embed_quant)  # [V, D]
    tw.add(T.OUTPUT_NORM, W["model.norm.weight"])
    if not tied or arch == "dots1":  # deepseek reuses token_embd when output is absent; dots1 needs its own
        tw.add(T.OUTPUT, W["lm_head.weight"] if not tied else W["model.embed_tokens.weight"], quant=embed_quant)
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    n_shared_rows = _shared_width(c)[1]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = (W[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        if arch == "deepseek":
            q, k = permute_for_rope_pairs(q, H), permute_for_rope_pairs(k, Hkv)
        elif Hkv != H:  # dots1: one kv head per query head
            k, v = repeat_kv_heads(k, H, Hkv), repeat_kv_heads(v, H, Hkv)
        tw.add(T.ATTN_NORM, W[p + "input_layernorm.weight"], i)
        tw.add(T.ATTN_Q, q, i)
        tw.add(T.ATTN_K, k, i)
        tw.add(T.ATTN_V, v, i)
        tw.add(T.ATTN_OUT, W[p + "self_attn.o_proj.weight"], i)
        if arch == "dots1":
            tw.add(T.ATTN_Q_NORM, W[p + "self_attn.q_norm.weight"], i)
            tw.add(T.ATTN_K_NORM, W[p + "self_attn.k_norm.weight"], i)
        tw.add(T.FFN_NORM, W[p + "post_attention_layernorm.weight"], i)
        tw.add(T.FFN_GATE_INP, W[p + "mlp.router.weight"], i, quant="f32")  # [E, D]: routing decisions stay exact
        gate_up = W[p + "mlp.experts.gate_up_proj"]  # [E, 2I, D]
        inter = gate_up.shape[1] // 2
        tw.add(T.FFN_GATE_EXP, gate_up[:, :inter], i)  # [E, I, D]
        tw.add(T.FFN_UP_EXP, gate_up[:, inter:], i)
        tw.add(T.FFN_DOWN_EXP, W[p + "mlp.experts.down_proj"], i)  # [E, D, I]
        D = gate_up.shape[-1]
        if p + "mlp.shared_expert.gate_proj.weight" in W:
            s_gate, s_up = W[p + "mlp.shared_expert.gate_proj.weight"], W[p + "mlp.shared_expert.up_proj.weight"]
            s_down = W[p + "mlp.shared_expert.down_proj.weight"]  # [D, S]
        else:
            s_gate = s_up = torch.zeros(0, D)
            s_down = torch.zeros(D, 0)
        tw.add(T.FFN_GATE_SHEXP, _pad_rows(s_gate, n_shared_rows), i)  # [S', D]
        tw.add(T.FFN_UP_SHEXP, _pad_rows(s_up, n_shared_rows), i)
        tw.add(T.FFN_DOWN_SHEXP, _pad_rows(s_down.T, n_shared_rows).T.contiguous(), i)  # [D, S']


def write_hparams(writer: gguf.GGUFWriter, c: dict, arch: str, quant: str, name: str) -> None:
    """Model metadata: attention and rope as in the source, the MoE layout, and the routed weighting."""
    writer.add_name(name)
    writer.add_file_type(int(_FILE_TYPES[quant]))
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    n_shared, shared_rows = _shared_width(c)
    writer.add_feed_forward_length(c["num_experts"] * c["moe_intermediate_size"] + shared_rows)
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(kv_heads_in_file(c, arch))
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_freq_base(float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_leading_dense_block_count(0)
    writer.add_expert_count(c["num_experts"])
    writer.add_expert_used_count(c["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
    writer.add_expert_shared_count(n_shared)
    writer.add_expert_weights_scale(1.0)  # any per-expert scale is folded into down_proj at carve time
    if arch == "dots1":
        writer.add_expert_weights_norm(False)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


# --- tokenizer ---------------------------------------------------------------------------------------------------

def source_gguf(provenance: dict) -> Path | None:
    """The GGUF file the MoE's dense source was read from, if any (the bundled SmolLM2 or a .gguf path)."""
    from tiny_onn.sources.loading import SMOLLM2_ALIAS, smollm2_gguf_path

    spec = recorded_model(provenance, "source_model")
    if spec == SMOLLM2_ALIAS:
        return smollm2_gguf_path()
    if spec.endswith(".gguf") and Path(spec).expanduser().is_file():
        return Path(spec).expanduser()
    return None


def copy_gguf_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    """Copy every tokenizer.* key (vocabulary, merges, special ids, chat template) from the source GGUF unchanged."""
    reader = gguf.GGUFReader(path)
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tokens != vocab_size:
        raise TinyOnnError(f"the source GGUF {path} has {n_tokens} tokens but the MoE's vocabulary is {vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_hf_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE tokenizer (tokenizer.json) as llama.cpp's 'gpt2' model; anything else is refused."""
    from transformers import AutoTokenizer

    tj_file = folder / "tokenizer.json"
    if not tj_file.is_file():
        raise TinyOnnError(f"{folder} has no tokenizer.json; export needs a byte-level BPE tokenizer or a GGUF source")
    tj = json.loads(tj_file.read_text())
    pre = tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in pres if p.get("type") == "ByteLevel"]
    if tj.get("model", {}).get("type") != "BPE" or len(pres) != 1 or not byte_level or not byte_level[0].get("use_regex", True):
        raise TinyOnnError(
            f"the tokenizer in {folder} is not a plain GPT-2-style byte-level BPE, the only kind exported from a Hugging "
            "Face folder; carve from a .gguf source (its tokenizer is copied exactly) to export this model"
        )
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids)
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(_BPE_TOKEN_TYPES["unused"])
        elif i in special or (t in added and added[t].special):
            tokens.append(t)
            types.append(_BPE_TOKEN_TYPES["control"])
        else:
            tokens.append(t)
            types.append(_BPE_TOKEN_TYPES["user"] if t in added else _BPE_TOKEN_TYPES["normal"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tok, attr, None) is not None:
            add(getattr(tok, attr))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]))
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)


# --- the whole file ----------------------------------------------------------------------------------------------

def check_gguf_out(out: str | Path) -> None:
    """One clear error, before converting, when `out` exists and is not an earlier GGUF (a folder, or a file of
    something else, which the export would replace)."""
    path = check_folder_can_be_made(out)
    if path.is_dir():
        raise TinyOnnError(f"--out {out} is a folder; give the GGUF file to write, e.g. {Path(out) / 'model.gguf'}")
    if path.exists():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise TinyOnnError(f"--out {out} exists and is not a GGUF file, which the export would replace; "
                                   "give another path or remove it")
        if not written_by_export(path):
            raise TinyOnnError(f"--out {out} is a GGUF that tiny-onn export did not write (a source model?), which the "
                               "export would replace; give another path, or remove it first if it may go")


EXPORT_NAME_PREFIX = "TinyOnn MoE"  # general.name of every GGUF this module writes


def written_by_export(path: Path) -> bool:
    """Whether the GGUF at `path` is an earlier export (its general.name), so that a new one may replace it."""
    try:
        field = gguf.GGUFReader(path).fields.get("general.name")
        name = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else ""
    except Exception:  # noqa: BLE001 — a GGUF we cannot read is not one we know we wrote
        return False
    return name.startswith(EXPORT_NAME_PREFIX)


def export_gguf(folder: str | Path, out: str | Path, quant: str = "f16") -> dict:
    """Write MoE `folder` as a GGUF at `out` (atomically); return a summary (architecture, tensor types, bytes)."""
    if quant not in QUANTS:
        raise TinyOnnError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    check_gguf_out(out)
    moe = read_moe_folder(folder)
    arch = target_architecture(moe.config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = source_gguf(moe.provenance)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        write_hparams(writer, moe.config, arch, quant, f"{EXPORT_NAME_PREFIX} ({moe.path.name})")
        if src is not None:
            copy_gguf_tokenizer(writer, src, moe.config["vocab_size"])
        else:
            write_hf_tokenizer(writer, moe.path, moe.config["vocab_size"])
        tw = _TensorWriter(writer, arch, quant)
        write_tensors(tw, moe, arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"architecture": arch, "quant": quant, "tensor_types": tw.types, "bytes": out.stat().st_size,
            "tokenizer": f"copied from {src}" if src is not None else "from the folder's tokenizer.json", "out": str(out)}
