"""`tiny-onn`: one sub-command per pipeline stage. Each is a thin wrapper: build the stage's config, call `stage.run(cfg)`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tiny_onn import __version__
from tiny_onn.config import add_config_args, config_from_args
from tiny_onn.errors import TinyOnnError


@dataclass
class Stage:
    name: str
    help: str
    config_cls: Callable[[], type]
    run: Callable[[object], object]
    done: Callable[[object, object], str]


def _scan_stage() -> Stage:
    from tiny_onn import scan

    return Stage(
        "scan",
        "scan a dense model: per-neuron activation/gradient statistics",
        lambda: scan.ScanConfig,
        scan.run,
        lambda cfg, out: f"scan written to {out} (scan.safetensors, scan.json)",
    )


def _carve_stage() -> Stage:
    from tiny_onn import carve

    return Stage(
        "carve",
        "carve a scanned dense model into a calibrated Mixture-of-Experts (Hugging Face folder)",
        lambda: carve.CarveConfig,
        carve.run,
        carve.summary,
    )


def _train_stage() -> Stage:
    from tiny_onn import train

    return Stage(
        "train",
        "continue training a carved MoE with expert-masked updates (full / smk / smk2) and distillation (or a dense control)",
        lambda: train.TrainConfig,
        train.run,
        train.summary,
    )


def _eval_stage() -> Stage:
    from tiny_onn.eval import harness

    return Stage(
        "eval",
        "evaluate models side by side: perplexity, tasks, probe, parameters, FLOPs, speed, memory, sparsity curve",
        lambda: harness.EvalConfig,
        harness.run,
        harness.summary,
    )


def _interpret_stage() -> Stage:
    from tiny_onn import interpret

    return Stage(
        "interpret",
        "profile and label the experts of a MoE; write a self-contained HTML dashboard",
        lambda: interpret.InterpretConfig,
        interpret.run,
        interpret.summary,
    )


def _export_stage() -> Stage:
    from tiny_onn import export

    return Stage(
        "export",
        "export a MoE folder for llama.cpp: a GGUF file (f16, q8_0, q4_0, q4_1) with the source's tokenizer",
        lambda: export.ExportConfig,
        export.run,
        export.summary,
    )


def _distil_data_stage() -> Stage:
    from tiny_onn.data import distil

    return Stage(
        "distil-data",
        "write a distillation corpus: the dense source answers fact, open and training-mix prompts (resumable)",
        lambda: distil.DistilDataConfig,
        distil.run,
        distil.summary,
    )


def _alchemy_stage() -> Stage:
    from tiny_onn import alchemy

    return Stage(
        "alchemy",
        "the whole pipeline from one YAML file: scan, carve, train, eval, interpret, and a summary table",
        lambda: alchemy.AlchemyConfig,
        alchemy.run,
        alchemy.summary,
    )


def _generate_stage() -> Stage:
    from tiny_onn import generate

    return Stage(
        "generate",
        "chat with a model folder (dense or MoE); --top-k/--top-p change the MoE routing",
        lambda: generate.GenerateConfig,
        generate.run,
        lambda cfg, text: text,
    )


STAGES: dict[str, Callable[[], Stage]] = {"scan": _scan_stage, "carve": _carve_stage, "distil-data": _distil_data_stage,
                                          "train": _train_stage, "eval": _eval_stage,
                                          "interpret": _interpret_stage, "export": _export_stage,
                                          "alchemy": _alchemy_stage, "generate": _generate_stage}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-onn", description="Turn a dense SwiGLU LLM into a sparse Mixture-of-Experts by extraction."
    )
    parser.add_argument("--version", action="version", version=f"tiny-onn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, make in STAGES.items():
        stage = make()
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        add_config_args(p, stage.config_cls())
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def interrupted_note(stage: str, cfg) -> str:
    """What an interrupted command kept, and how to continue: the resumable stages keep their finished work."""
    if not getattr(cfg, "out", ""):  # interrupted before the options were read, or a command without outputs
        return "no partial artifact was kept"
    out = Path(cfg.out)
    checkpoints = out / "checkpoints"
    if stage == "train" and checkpoints.is_dir() and any(checkpoints.iterdir()):
        return (f"no trained model was written; the checkpoints in {checkpoints} are kept: add --resume to the same "
                "command to continue")
    if stage == "distil-data" and (out / "corpus.json").is_file():
        return f"the unfinished corpus in {out} is kept: run the same command again to continue it"
    if stage == "alchemy" and out.is_dir() and any(out.iterdir()):
        return (f"the finished stages (and any training checkpoints) in {out} are kept: run the same command again to "
                "continue")
    return "no partial artifact was kept"


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a job scheduler), raised where the process is, so that it stops as Ctrl-C does: partial
    outputs removed, checkpoints kept."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation failure (host or GPU), which the user fixes with smaller sizes, not a bug."""
    import torch

    if isinstance(e, MemoryError | getattr(torch, "OutOfMemoryError", MemoryError)):
        return True
    return "can't allocate memory" in str(e) or "out of memory" in str(e)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tiny-onn` console script; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug
    cfg = None
    # not where signals cannot be set (another thread) or where the process was started with SIGTERM ignored
    handles_sigterm = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, None))
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if handles_sigterm else None
    try:
        _quiet_libraries()
        stage = STAGES[args.stage]()
        cfg = config_from_args(stage.config_cls(), args, section=args.stage)
        out = stage.run(cfg)
        print(stage.done(cfg, out))
        return 0
    except TinyOnnError as e:
        if debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever a wrapped library error held
        print(f"tiny-onn {args.stage}: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if debug or not _out_of_memory(e):
            raise
        message = " ".join(str(e).split())[:200]
        print(f"tiny-onn {args.stage}: error: out of memory ({message}); lower the sizes of this run (--seq-len, "
              f"--batch-size, --tokens or --speed-seq-len) and run it again; {interrupted_note(args.stage, cfg)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"tiny-onn {args.stage}: {how}; {interrupted_note(args.stage, cfg)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
        from tiny_onn import distributed

        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
