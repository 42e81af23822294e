"""Tiny vision-language proxy models shipped with tokenpress, trained on the shapes benchmark.

``zoo:llava-shapes`` (LlavaForConditionalGeneration) and ``zoo:qwen2.5-vl-shapes``
(Qwen2_5_VLForConditionalGeneration) are ordinary Hugging Face checkpoints stored under
``checkpoints/``; ``tokenpress.zoo.train`` rebuilds them from a seed.
"""

from __future__ import annotations

import argparse
import pathlib

ZOO_DIR = pathlib.Path(__file__).parent / "checkpoints"
ZOO_NAMES: tuple[str, ...] = ("llava-shapes", "qwen2.5-vl-shapes")
#: The proxies ``tokenpress zoo train`` can build: the shipped ones and those whose recipe is ready.
TRAINABLE: tuple[str, ...] = (*ZOO_NAMES, "llava-shapes-deep")


def zoo_path(name: str) -> pathlib.Path:
    """Folder of the zoo checkpoint ``name`` (``"llava-shapes"`` or ``"zoo:llava-shapes"``)."""
    key = name.removeprefix("zoo:")
    if key not in ZOO_NAMES:
        raise ValueError(f"Unknown zoo model {name!r}; available: {', '.join(ZOO_NAMES)}.")
    return ZOO_DIR / key


def check_not_shipped(folder: pathlib.Path, what: str) -> None:
    """Refuse to write ``what`` into the package's own files (in a normal install: site-packages)."""
    package = pathlib.Path(__file__).resolve().parent.parent
    target = folder.expanduser().resolve()
    if target == package or package in target.parents:
        from tokenpress.errors import InputError

        raise InputError(f"{folder}: refusing to write {what} inside the installed tokenpress package (its shipped "
                         "files are read-only); choose a folder of your own")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tokenpress zoo train`` and ``python -m tokenpress.zoo.train`` (kept light:
    building the ``tokenpress`` parser must not import torch)."""
    parser.add_argument("name", choices=TRAINABLE)
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help="the folder to write the checkpoint to (never the shipped one: copy a checkpoint "
                             "into tokenpress/zoo/checkpoints/ by hand to ship it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out (its train-state.pt, written at every evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto: CUDA when available")
    parser.add_argument("--workers", type=int, default=0, help="background processes that build training batches")
    parser.add_argument("--no-card", action="store_true",
                        help="save the checkpoint only; measure it later with `tokenpress zoo card`")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the recipe for an experiment, e.g. --set text_layers=6")
    parser.add_argument("--no-progress", action="store_true")
