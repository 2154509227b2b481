"""``apps/adl_denoise/cli.py`` run in the test's own process, as a process of its own would have run it.

A subprocess of the CLI spends seconds starting Python and importing torch, MONAI, pydicom and SimpleITK before it
does anything; a test that reruns a batch eight times spends most of its time there. :func:`run_cli` calls the same
``main()`` here instead and gives the test the same things back (exit status, stdout, stderr). Tests whose point is
the process itself (killed, timed out, a resource limit, a mount namespace, two runs at once) keep running it as a
subprocess (``processes.py``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence

from conftest import APP_DIR, import_cli

CLI = APP_DIR / "cli.py"
_cli = None


def run_cli(args: Sequence, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cli.py ARGS`` called in this process (its ``main``): its exit status, stdout and stderr as
    :func:`processes.run` returns those of ``[sys.executable, CLI, *args]``. ``args`` may also start with
    ``sys.executable, CLI`` (a command list built for a subprocess). What the CLI's own process would have had, it
    has here: ``env`` set in ``os.environ`` for the call (restored after), torch on one thread (the subprocesses'
    ``OMP_NUM_THREADS=1``), log records of WARNING and above (INFO with ``--verbose``) written to its stderr as
    ``main``'s ``logging.basicConfig`` writes them in a fresh process (here the root logger already has pytest's
    handlers, so that call does nothing), and the manifest locks it took on its output released once it returns, as
    its process's end releases them (``lib.batch.manifest.Manifest.lock`` keeps them for the life of the
    process: a second run here would be refused as a run still going on)."""
    global _cli
    args = [str(a) for a in args]
    if args[:2] == [sys.executable, str(CLI)]:
        args = args[2:]
    if _cli is None:
        _cli = import_cli()
    out, err = io.StringIO(), io.StringIO()
    locks = _manifest_locks()
    with _environment(env or {}), _one_torch_thread(), _logging_to(err, "--verbose" in args), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = _cli.main(args)
        except SystemExit as exit_:  # argparse's refusal of the arguments
            code = exit_.code if isinstance(exit_.code, int) else 2
        finally:
            for fd in set(_manifest_locks()) - set(locks):
                os.close(fd)
    return subprocess.CompletedProcess([sys.executable, str(CLI), *args], code, out.getvalue(), err.getvalue())


def _manifest_locks() -> dict[int, str]:
    """This process's open file descriptors of a batch manifest's lock files (``lock-rank-NNNNN``): fd -> path
    (none found without Linux's /proc: a second run on the same output is then refused, saying so)."""
    found: dict[int, str] = {}
    if not os.path.isdir("/proc/self/fd"):
        return found
    for entry in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor os.scandir itself used, closed since
            target = os.readlink(entry.path)
            if os.path.basename(target).startswith("lock-rank-"):
                found[int(entry.name)] = target
    return found


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _logging_to(stream: io.StringIO, verbose: bool) -> Iterator[None]:
    """What ``logging.basicConfig(level=..., format="%(levelname)s %(message)s")`` sets up in a fresh process,
    writing to ``stream``, for the block; the root logger's level and handlers restored after."""
    root = logging.getLogger()
    level = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(stream)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    saved_level, saved_handlers = root.level, list(root.handlers)
    root.setLevel(level)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
