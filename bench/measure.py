"""Measuring commands and the machine for the benchmarks: a subprocess's peak RSS, wall and CPU time,
and how much CPU other processes took meanwhile (the machine may be shared)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import resource
import signal
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

# ru_maxrss of a child forked from THIS process starts at this process's own peak (exec keeps the
# high-water mark of the pre-exec address space, and the benchmarks load torch + transformers), so a
# bare launcher process runs the command and reports ITS child's usage instead. It also pins the
# child to the first `cpus` cores (argv[2], 0 = all) and times it, its own start excluded.
_LAUNCHER = """
import os, subprocess, sys, time
cpus = int(sys.argv[2])
if cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
with open(sys.argv[1], "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, wall, usage.ru_utime + usage.ru_stime)
"""


@dataclasses.dataclass(frozen=True)
class Measured:
    peak_rss_bytes: int
    wall_s: float
    cpu_s: float  # the command's user + system CPU time
    other_cpu_s: float  # CPU time other processes on the machine took while it ran


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process) so far: their difference over a timed
    window is what OTHER processes took from us."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return machine, own.ru_utime + own.ru_stime


def run_measured(command: list[str], log_path: pathlib.Path, timeout: float | None = None, cpus: int = 0,
                 env: dict | None = None) -> Measured:
    """Runs `command` from the repository root (output in `log_path`, pinned to `cpus` cores, 0 = all);
    raises if it fails or runs past `timeout` seconds."""
    machine_start, own_start = busy_cpu_seconds()
    # Its own session, so that a timeout ends the command too, not only the launcher.
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(log_path), str(cpus), *command], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = launcher.communicate(timeout=timeout)
    except BaseException as error:  # a timeout, or Ctrl-C here: the command must not outlive us
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        if isinstance(error, subprocess.TimeoutExpired):
            raise RuntimeError(f"{' '.join(command)} ran past {timeout} s:\n{log_path.read_text()[-3000:]}") from None
        raise
    machine_end, own_end = busy_cpu_seconds()
    if launcher.returncode != 0:
        raise RuntimeError(f"the launcher of {' '.join(command)} failed ({launcher.returncode})")
    returncode, max_rss_kib, wall, cpu = stdout.split()
    if int(returncode) != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({returncode}):\n{log_path.read_text()[-3000:]}")
    other = (machine_end - machine_start) - (own_end - own_start) - float(cpu)
    return Measured(int(max_rss_kib) * 1024, float(wall), float(cpu), max(0.0, other))  # Linux reports KiB
