"""Run a slow call (denoising, uploading, training polls) off the GUI thread.

The Qt side polls :meth:`BackgroundTask.poll` from a ``qt.QTimer`` and updates the progress bar; nothing here
touches Qt or MRML, which must only be used from the GUI thread. The widget runs one server request at a time;
:class:`LocalTasks` runs what is computed locally from copies (the difference volume) beside it.

Cancelling: the task's state is ``cancelled`` at once, but it is :attr:`~BackgroundTask.finished` only once its
thread has ended, so that the GUI starts no new request while the cancelled one still writes files. The function
runs in a :func:`ADLDenoiseLib.client.cancel_scope`: the server client's calls stop at their next chunk, a call
waiting for an answer has its connection shut down, and neither leaves a partial file (the server may still
finish work it already had; its answer is dropped). A late result is discarded.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .client import Cancellation, cancel_scope

__all__ = ["BackgroundTask", "LocalTasks"]


class BackgroundTask:
    """``BackgroundTask(function, *args)``: ``function(*args, report=..., cancelled=...)`` runs in a daemon
    thread; ``report(fraction or None, message)`` records progress, ``cancelled()`` tells it to stop early.

    States: ``running``, ``done`` (``result``), ``failed`` (``error``), ``cancelled`` (set by :meth:`cancel`
    while the thread may still be stopping: see :attr:`finished`).
    """

    def __init__(self, function: Callable[..., Any], *args: Any, name: str = "task") -> None:
        self.name = name
        self.state = "running"
        self.result: Any = None
        self.error: BaseException | None = None
        self.progress: float | None = None
        self.message = "starting"
        self.started = time.monotonic()
        self._cancel = Cancellation()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(function, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: tuple) -> None:
        try:
            with cancel_scope(self._cancel):
                result = function(*args, report=self._report, cancelled=self._cancel.is_set)
        except BaseException as error:  # noqa: BLE001 - handed to the GUI thread to display
            with self._lock:
                if self.state == "running":
                    self.state, self.error = "failed", error
                else:
                    self.message = "cancelled"
            return
        with self._lock:
            if self.state == "running":
                self.state, self.result, self.progress = "done", result, 1.0
            else:
                self.message = "cancelled"

    def _report(self, fraction: float | None, message: str) -> None:
        with self._lock:
            self.progress, self.message = fraction, message

    def cancel(self) -> None:
        """Stop the call. A result that came back but was not taken yet (the GUI polls every few hundred ms) is
        dropped too: Close Scene cancels, and a study downloaded or denoised for the closing scene must not be
        loaded into the next one (its files are deleted with the scene)."""
        with self._lock:
            if self.state == "running":
                self.state, self.message = "cancelled", "cancelling: stopping the transfer"
            elif self.state == "done":
                self.state, self.result, self.message = "cancelled", None, "cancelled"
        self._cancel.cancel()

    def poll(self) -> dict:
        """A snapshot for the GUI: state, progress (0..1 or None), message, seconds elapsed."""
        with self._lock:
            return {"state": self.state, "progress": self.progress, "message": self.message,
                    "seconds": time.monotonic() - self.started}

    def wait(self, timeout: float | None = None) -> str:
        self._thread.join(timeout)
        return self.state

    @property
    def finished(self) -> bool:
        """True once the thread has ended (not merely once cancelled: a cancelled call may still be stopping)."""
        return not self._thread.is_alive()


class LocalTasks:
    """Computations made locally from copies taken on the GUI thread (the difference volume: no server request, no
    workflow state), each in a :class:`BackgroundTask` of its own under a key, so that they run beside the one request
    the widget allows at a time without touching it (its task, answer callbacks, progress bar, Cancel button). One
    task per key at a time (:meth:`start` refuses a second); :meth:`poll` (GUI thread, from a timer) hands each
    finished task's answer to its ``on_done``; :meth:`cancel_all` (Close Scene, module closed) drops every answer
    not taken yet."""

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[BackgroundTask, Callable[[Any], None]]] = {}

    def running(self, key: str) -> bool:
        """Whether the task ``key`` was started and its answer not taken yet."""
        return key in self._tasks

    @property
    def busy(self) -> bool:
        """Whether any task's answer is still to be taken (the caller's timer may stop otherwise)."""
        return bool(self._tasks)

    def start(self, key: str, function: Callable[..., Any], on_done: Callable[[Any], None],
              name: str = "local task") -> BackgroundTask:
        """Run ``function(report=..., cancelled=...)`` in a :class:`BackgroundTask`; ``on_done(result)`` is called by
        :meth:`poll` once it succeeded. Raises RuntimeError while the task ``key`` still runs."""
        if key in self._tasks:
            raise RuntimeError(f"the {key} is still being computed: wait a moment")
        task = BackgroundTask(function, name=name)
        self._tasks[key] = (task, on_done)
        return task

    def poll(self) -> list[BaseException]:
        """GUI thread: the answers of the tasks that ended, to their ``on_done``; returns the errors (a task that
        failed, an ``on_done`` that refused its answer) for the caller to show."""
        errors: list[BaseException] = []
        for key, (task, on_done) in list(self._tasks.items()):
            if not task.finished:
                continue
            del self._tasks[key]
            if task.state == "failed":
                errors.append(task.error)
            elif task.state == "done":
                try:
                    on_done(task.result)
                except Exception as error:  # noqa: BLE001 - handed to the caller to display
                    errors.append(error)
        return errors

    def cancel_all(self) -> None:
        """Cancel every task; their answers are dropped, even one that came back but was not taken yet."""
        for task, _ in self._tasks.values():
            task.cancel()
        self._tasks.clear()
