"""Subprocesses for tests: each starts in a session (process group) of its own, and is ended as a whole group.

A test that kills only the process it started leaves that process's children running, orphaned: torchrun's
workers, a MONAI Label server's training job, the server that ``run.sh`` starts. Every subprocess a test starts
goes through this module, so the group is what is stopped, and a test that gives up waits for it to be gone.

Timeouts are the caller's; they are meant as generous limits for a loaded 2-core machine, not as expectations.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

Command = Sequence[str | os.PathLike]


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    # The group id is the leader's PID (start_new_session); PIDs are handed out cyclically, so the id still names
    # this group (or nothing) even after the leader has been reaped.
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running. Zombies do not count: an orphan that was killed
    waits for init to reap it, and not every container's init does."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 probes the group (zombies included)
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the id now names another user's group
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (command)"
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _wait_group_gone(process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_group(process: subprocess.Popen, wait: float = 30.0) -> None:
    """SIGKILL to the whole group of ``process``; waits (up to ``wait`` s) for the leader and the rest."""
    _signal_group(process, signal.SIGKILL)
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        pass
    _wait_group_gone(process, wait)


def stop(process: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to the whole group, ``grace`` seconds for it to shut down cleanly, then SIGKILL to what is left."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    kill_group(process)


def start(args: Command, log_path: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` in a new session, stdout and stderr to ``log_path``; stop it with :func:`stop`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def run(args: Command, timeout: float, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run(args, capture_output=True, text=True, timeout=timeout)``, in a new session; on a
    timeout (or an interrupt) the whole group is killed and waited for before the error propagates."""
    args = [str(a) for a in args]
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr) from None
    except BaseException:
        kill_group(process)
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def start_service(args: Command, log_path: Path, ready_url: str, timeout: float, cwd: Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """:func:`start` a server and return once ``ready_url`` answers 200. When the server exits first or
    ``timeout`` seconds pass, its group is stopped and a RuntimeError (with the end of its log) raised."""
    process = start(args, log_path, cwd=cwd, env=env)
    try:
        _wait_for_http(ready_url, process, timeout, log_path)
    except BaseException:
        stop(process)
        raise
    return process


def torchrun_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``torchrun`` job started by a test (``base``, else ``os.environ``, with one OpenMP
    thread): its TMPDIR is ``folder/tmp`` (created; ``folder`` is the test's ``tmp_path``, which pytest removes),
    where torchrun writes the ``torchelastic_*`` folder it leaves behind at every run (else /tmp, which filled)."""
    scratch = Path(folder) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    return dict(os.environ if base is None else base, OMP_NUM_THREADS="1", TMPDIR=str(scratch))


@functools.cache  # asked by skipif marks, at collection
def private_tmpfs_problem() -> str | None:
    """Why a test cannot mount a small tmpfs in a mount namespace of its own (``unshare``, :func:`on_tmpfs`), None
    when it can."""
    import tempfile

    if not shutil.which("unshare"):
        return "no unshare command"
    with tempfile.TemporaryDirectory() as folder:
        tried = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                                'mount -t tmpfs -o size=1m tmpfs "$1"', "sh", folder],
                               capture_output=True, text=True, timeout=60)
    return None if tried.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace: {tried.stderr}"


def on_tmpfs(folder: Path, size_mib: int, args: Command,
             also: tuple[tuple[Path, int], ...] = ()) -> list[str | os.PathLike]:
    """``args`` run with a real tmpfs of ``size_mib`` MiB mounted over ``folder`` (an existing folder), and one of
    each ``(folder, size_mib)`` of ``also``, in a mount namespace of their own (``unshare``; see
    :func:`private_tmpfs_problem`): a real small disk there, for them alone. The command ``exec``s ``args``, so the
    process started is theirs."""
    mounts = [(folder, size_mib), *also]
    script = " && ".join(f'mount -t tmpfs -o size={int(size)}m tmpfs "${index}"'
                         for index, (_, size) in enumerate(mounts, start=1))
    return ["unshare", "--map-root-user", "--mount", "sh", "-c", f'{script} && shift {len(mounts)} && exec "$@"',
            "sh", *(path for path, _ in mounts), *args]


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # a refused connection on loopback costs nothing; Orthanc answers 50 ms after its start
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log_tail(log_path)}")


def log_tail(log_path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a log ('' when it cannot be read)."""
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
