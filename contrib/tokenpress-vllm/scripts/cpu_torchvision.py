"""Make the registry's CUDA-built torchvision importable next to a CPU-only torch.

PyPI's torchvision wheels for Linux are CUDA builds: their C++ ops (``torchvision/_C.so``) link
``libtorch_cuda.so`` and cannot load with ``torch==2.13.0+cpu``. torchvision then skips its ops, except
the fake (meta) kernels of ``nms`` and ``qnms``, which it registers unconditionally and which fail with
``operator torchvision::nms does not exist`` - so ``import torchvision`` (and with it every transformers
image processor, and vLLM's LLaVA path) breaks. The Python half of torchvision (``transforms.v2``,
what the image processors use) needs none of those ops.

This script registers those two fake kernels only when the ops exist, by editing
``torchvision/_meta_registrations.py`` of the environment it runs in. It edits nothing when the ops
load (a CPU build) or when the file was already edited, and says what it did in one line.

    python scripts/cpu_torchvision.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GUARD_NAME = "_register_fake_if_ops"
GUARD = f'''

def {GUARD_NAME}(name):
    """torch.library.register_fake when torchvision's C++ ops loaded, else no registration (CPU torch with a
    CUDA-built torchvision: the ops are missing, and only the Python transforms are used)."""
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''
ANCHOR = "import torchvision.extension  # noqa: F401\n"
UNGUARDED = '@torch.library.register_fake("torchvision::'


def registrations_file() -> Path:
    """``torchvision/_meta_registrations.py`` of this environment, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("cpu_torchvision: torchvision is not installed in this environment")
    return Path(spec.origin).parent / "_meta_registrations.py"


def ops_load() -> bool:
    """Whether torchvision's C++ ops load with the installed torch (what its own extension module tries)."""
    import torch

    library = next(registrations_file().parent.glob("_C*.so"), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False
    return True


def main() -> int:
    path = registrations_file()
    source = path.read_text()
    if GUARD_NAME in source:
        print(f"cpu_torchvision: {path} is already guarded")
        return 0
    if ops_load():
        print("cpu_torchvision: torchvision's C++ ops load with this torch; nothing to do")
        return 0
    if ANCHOR not in source or UNGUARDED not in source:
        print(f"cpu_torchvision: {path} does not have the expected layout; edit it by hand", file=sys.stderr)
        return 1
    source = source.replace(ANCHOR, ANCHOR + GUARD, 1)
    source = source.replace(UNGUARDED, f'@{GUARD_NAME}("torchvision::')
    path.write_text(source)
    print(f"cpu_torchvision: {path} now registers nms/qnms fake kernels only when torchvision's ops load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
