"""The notebooks of a class, ``--jobs`` at a time, each in its own kernel on the same sandbox.

Threads are enough: each one only waits on its kernel's messages. A notebook's problems end up
in its row; only an interruption (Ctrl-C, SIGTERM, SIGHUP) stops the batch, and then every
kernel is killed before returning.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from ..settings import SandboxSettings
from .progress import Progress
from .results import NotebookResult, Question, Status
from .runner import GradingStopped, KernelRegistry, NotebookGrader

#: Seconds between redraws of a terminal's countdown.
_TICK = 1.0


def grade_all(
    notebooks: list[tuple[Path, str]],
    questions: list[Question],
    settings: SandboxSettings,
    *,
    jobs: int,
    timeout: float,
    progress: Progress,
) -> list[NotebookResult]:
    """The rows of ``notebooks`` (path, label), in the order given.

    A KeyboardInterrupt (or :class:`~sandbox_kernel.lab.StopSignal`) raised in this thread
    kills every kernel, waits for the workers to clean up, and propagates."""
    registry = KernelRegistry()
    grader = NotebookGrader(settings, questions, timeout, registry)

    def grade_one(path: Path, label: str) -> NotebookResult:
        try:
            result = grader.grade(path, label)
        except GradingStopped:
            raise
        except Exception as error:  # a kernel that could not even start: the row says so
            result = NotebookResult.empty(label, questions)
            result.status = Status.KERNEL_DIED
            result.problem = f"the kernel could not run: {type(error).__name__}: {error}"[:300]
        progress.done(result)
        return result

    pool = concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="grade")
    futures = [pool.submit(grade_one, path, label) for path, label in notebooks]
    try:
        progress.start()
        pending = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=_TICK)
            progress.tick()
        progress.finish()
        return [future.result() for future in futures]
    except BaseException:
        registry.kill_all()
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
