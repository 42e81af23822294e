"""Small C kernels a method ships as source, compiled on first use for the machine it runs on.

A method whose CPU path is bound by memory traffic between torch operations (a softmax over a matrix
that a fused loop would keep in cache) may ship a C file and load it with :func:`load_kernel`. The file
is compiled once per machine with the system's C compiler (``cc -O3 -march=native -fopenmp``), cached
under ``$TOKENPRESS_CACHE`` (default ``~/.cache/tokenpress``), and loaded with :mod:`ctypes`.

Where it cannot run, :func:`load_kernel` returns ``None`` and says why once (logger ``tokenpress``), and
the method keeps its torch path, which stays the reference a kernel is tested equal to:

* ``TOKENPRESS_NATIVE=0`` turns every kernel off (to compare, or to rule a kernel out);
* no C compiler, or the compile fails;
* torch does not run on GNU OpenMP in this process (a kernel's threads must be torch's own threads:
  a second OpenMP runtime, or threads of its own, would compete with torch's for the same cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

#: The compiler flags; part of the cache key. ``-ffast-math`` lets the compiler vectorise ``expf`` and
#: reorder sums, which changes results in the last bits only (a kernel's tests compare with a tolerance).
#: On x86-64, 512-bit vectors where the CPU has them (GCC prefers 256 by default; ALVTS's score kernel
#: runs about 15% faster with 512 on a Sapphire Rapids core).
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c11") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())

logger = logging.getLogger("tokenpress")


class CompileError(Exception):
    """The compiler refused a kernel's source (the message is its first error line)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("TOKENPRESS_CACHE", Path.home() / ".cache" / "tokenpress")) / "native"


def _torch_on_gnu_openmp() -> bool:
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no way to tell which runtime torch loaded
        return False


def _machine_key(source: bytes, compiler: str) -> str:
    """What the compiled file depends on: the source, the flags, the compiler and this CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    digest = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), cpu.encode()]))
    return digest.hexdigest()[:16]


@functools.cache
def load_kernel(source: Path) -> ctypes.CDLL | None:
    """The compiled ``source`` (a C file), loaded; ``None`` where it cannot run here (the reason is logged)."""
    def unavailable(reason: str) -> None:
        logger.info("tokenpress: %s not used (%s); the torch path runs instead", source.name, reason)

    if os.environ.get("TOKENPRESS_NATIVE", "1") == "0":
        return unavailable("TOKENPRESS_NATIVE=0")
    if not _torch_on_gnu_openmp():
        return unavailable("torch does not run on GNU OpenMP in this process")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return unavailable("no C compiler found")
    try:
        target = _compiled(source, compiler)
    except (OSError, subprocess.SubprocessError, CompileError) as error:
        return unavailable(f"compiling failed: {error}")
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        return unavailable(f"loading failed: {error}")


def _compiled(source: Path, compiler: str) -> Path:
    """The cached shared library of ``source``, compiled first if this machine has none yet."""
    target = _cache_dir() / f"{source.stem}-{_machine_key(source.read_bytes(), compiler)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # compiled beside the target, then renamed: processes compiling at once never load a partial file
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
                raise CompileError(f"{compiler}: {next((line for line in lines if 'error' in line), lines[-1])}")
            os.replace(built, target)
    return target
