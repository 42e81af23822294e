"""Tiny vision-language proxy models shipped with tokenpress, trained on the shapes benchmark.

``zoo:llava-shapes`` and ``zoo:llava-shapes-deep`` (LlavaForConditionalGeneration; the second with a
12-layer decoder, for layer-wise methods) and ``zoo:qwen2.5-vl-shapes`` (Qwen2_5_VLForConditionalGeneration)
are ordinary Hugging Face checkpoints stored under ``checkpoints/``; ``tokenpress.tools.zoo_train`` rebuilds
them from a seed. This package is data and its paths only: it imports nothing of tokenpress.
"""

from __future__ import annotations

import pathlib

ZOO_DIR = pathlib.Path(__file__).parent / "checkpoints"
ZOO_NAMES: tuple[str, ...] = ("llava-shapes", "qwen2.5-vl-shapes", "llava-shapes-deep")
def zoo_path(name: str) -> pathlib.Path:
    """Folder of the zoo checkpoint ``name`` (``"llava-shapes"`` or ``"zoo:llava-shapes"``)."""
    key = name.removeprefix("zoo:")
    if key not in ZOO_NAMES:
        raise ValueError(f"Unknown zoo model {name!r}; available: {', '.join(ZOO_NAMES)}.")
    return ZOO_DIR / key
