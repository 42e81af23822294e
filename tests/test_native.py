"""tokenpress.core.native: a method's C kernel is compiled once per machine, cached, and left out, with
its reason logged, wherever it cannot run."""

from __future__ import annotations

import ctypes
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenpress.core import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")

ADD = "int add(int a, int b) { return a + b; }\n"
THREADS = """#include <omp.h>
int threads(int n)
{
    int seen = 0;
#pragma omp parallel num_threads(n)
    {
#pragma omp single
        seen = omp_get_num_threads();
    }
    return seen;
}
"""


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache, and no compiled kernel remembered by this process."""
    monkeypatch.setenv("TOKENPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TOKENPRESS_NATIVE", raising=False)
    native.load_kernel.cache_clear()
    yield tmp_path
    native.load_kernel.cache_clear()


def source(folder: Path, text: str, name: str = "kernel.c") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_a_kernel_is_compiled_once_and_then_loaded_from_the_cache(fresh: Path) -> None:
    path = source(fresh, ADD)
    library = native.load_kernel(path)
    assert library is not None and library.add(2, 3) == 5
    compiled = list((fresh / "cache" / "native").glob("kernel-*.so"))
    assert len(compiled) == 1
    built_at = compiled[0].stat().st_mtime_ns
    native.load_kernel.cache_clear()  # a new process: the file is there, nothing is compiled again
    assert native.load_kernel(path).add(4, 5) == 9
    assert compiled[0].stat().st_mtime_ns == built_at
    assert list((fresh / "cache" / "native").iterdir()) == compiled  # no scratch folder left behind


def test_a_changed_source_is_compiled_again(fresh: Path) -> None:
    path = source(fresh, ADD)
    assert native.load_kernel(path).add(1, 1) == 2
    path.write_text(ADD.replace("a + b", "a * b"))
    native.load_kernel.cache_clear()
    assert native.load_kernel(path).add(3, 3) == 9
    assert len(list((fresh / "cache" / "native").glob("kernel-*.so"))) == 2


def test_a_kernel_that_does_not_compile_leaves_the_torch_path_and_says_why(fresh: Path, caplog) -> None:
    path = source(fresh, "int add(int a, int b) { return a + ; }\n", "broken.c")
    with caplog.at_level(logging.INFO, logger="tokenpress"):
        assert native.load_kernel(path) is None
    assert "broken.c not used" in caplog.text and "failed" in caplog.text
    assert not list((fresh / "cache" / "native").glob("*.so"))


def test_tokenpress_native_0_turns_every_kernel_off(fresh: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TOKENPRESS_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger="tokenpress"):
        assert native.load_kernel(source(fresh, ADD)) is None
    assert "TOKENPRESS_NATIVE=0" in caplog.text
    assert not (fresh / "cache").exists()


def test_a_kernel_runs_on_torchs_own_openmp_threads(fresh: Path) -> None:
    """The kernel links the OpenMP runtime torch has already loaded, not a second one: its threads are
    torch's threads (``torch.get_num_threads()`` of them when asked)."""
    import torch

    path = source(fresh, THREADS)
    library = native.load_kernel(path)
    assert library is not None
    assert library.threads(ctypes.c_int(torch.get_num_threads())) == torch.get_num_threads()
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(loaded) == 1, f"two OpenMP runtimes in one process: {loaded}"
