"""The options of ``tokenpress zoo train`` and the rule every zoo command keeps: the shipped checkpoints are
read-only. Kept light (no torch): building the ``tokenpress`` parser imports it."""

from __future__ import annotations

import argparse
import pathlib

import tokenpress
from tokenpress.core.errors import InputError
from tokenpress.zoo import ZOO_NAMES


def check_not_shipped(folder: pathlib.Path, what: str) -> None:
    """Refuse to write ``what`` into the package's own files (in a normal install: site-packages)."""
    package = pathlib.Path(tokenpress.__file__).resolve().parent
    target = folder.expanduser().resolve()
    if target == package or package in target.parents:
        raise InputError(f"{folder}: refusing to write {what} inside the installed tokenpress package (its shipped "
                         "files are read-only); choose a folder of your own")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tokenpress zoo train`` and ``python -m tokenpress.tools.zoo_train`` (kept light:
    building the ``tokenpress`` parser must not import torch)."""
    parser.add_argument("name", choices=ZOO_NAMES)  # every shipped proxy can be rebuilt
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
