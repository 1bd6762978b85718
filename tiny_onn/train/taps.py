"""Forward hooks that keep each decoder layer's output of the last forward (hidden-state distillation's inputs)."""

from __future__ import annotations

import torch

from tiny_onn.errors import TinyOnnError
from tiny_onn.sources.architecture import decoder_layers


class LayerOutputTaps:
    """Keeps the hidden states [B, T, D] each decoder layer of `model` returned in its last forward (with their graph,
    when the forward had one)."""

    def __init__(self, model):
        layers = decoder_layers(model)
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._keep(i)) for i, layer in enumerate(layers)]

    def _keep(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def states(self) -> list[torch.Tensor]:
        if any(o is None for o in self.outputs):
            raise TinyOnnError("no forward has run through every decoder layer since the taps were set")
        return list(self.outputs)

    def clear(self) -> None:
        self.outputs = [None] * len(self.outputs)


def check_same_stack(student, teacher) -> None:
    """Hidden-state distillation pairs layer l of the student with layer l of the teacher: same depth and width."""
    s, t = student.config, teacher.config
    if (s.num_hidden_layers, s.hidden_size) != (t.num_hidden_layers, t.hidden_size):
        raise TinyOnnError(f"hidden-state distillation needs the teacher's depth and width: the student has "
                           f"{s.num_hidden_layers} layers of width {s.hidden_size}, the teacher {t.num_hidden_layers} "
                           f"of {t.hidden_size}; use the carve's source as --teacher or set --hidden-kd 0")
