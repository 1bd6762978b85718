"""Load a dense source model and find its SwiGLU FFNs."""

from tiny_onn.sources.architecture import SUPPORTED_FAMILIES, SwiGluMlp, decoder_layers, swiglu_mlps
from tiny_onn.sources.loading import SMOLLM2_ALIAS, Source, SourceArgs, load_source, resolve_dtype, smollm2_gguf_path

__all__ = [
    "SMOLLM2_ALIAS",
    "SUPPORTED_FAMILIES",
    "Source",
    "SourceArgs",
    "SwiGluMlp",
    "decoder_layers",
    "load_source",
    "resolve_dtype",
    "smollm2_gguf_path",
    "swiglu_mlps",
]
