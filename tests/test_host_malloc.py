"""`host_malloc.keep_freed_memory`: a block freed by one thread is reused without touching fresh pages,
as XLA:CPU's per-execution buffers are (allocated and freed by its worker threads)."""

import platform
import subprocess
import sys

import pytest

# Page faults of allocating, filling and freeing 256 MiB, twice, in a fresh worker thread each time.
PROBE = """
import ctypes, resource, sys, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from mrrm_jax.core import host_malloc
    host_malloc.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def fill():
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(ctypes.c_void_p(block))
counts = []
for _ in range(2):
    before = faults()
    worker = threading.Thread(target=fill)
    worker.start()
    worker.join()
    counts.append(faults() - before)
print(*counts)
"""


def faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = (256 << 20) // 4096
    default_first, default_second = faults("default")
    assert default_second > pages // 2  # glibc's default: the freed block went back to the kernel
    kept_first, kept_second = faults("keep")
    assert kept_first > pages // 2 and kept_second < pages // 100
