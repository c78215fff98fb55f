"""The task engine: Celery on the cluster's Redis, configured as measured (design A2, B2, B4).

**Stable API** (the front imports it; keep these names and signatures):

- :func:`make_engine` ``(settings) -> celery.Celery``: the engine of one front or worker;
- :func:`publish` ``(app, job_json, queue) -> None``: put one job on a queue (blocking: a
  front calls it from its one-thread publisher, never on its event loop);
- :data:`TASK_NAME`, the one task, and the queue names of :mod:`.keys`
  (:data:`~.keys.SHARED_QUEUE`, :func:`~.keys.worker_queue`).

**The contract between fronts and workers**: a message of the task :data:`TASK_NAME`
(``"sk.run_job"``) with exactly **one positional argument**, the job message as JSON text
(:meth:`.jobs.JobSpec.to_json`), no keyword arguments, on ``sk.shared`` (any worker) or
``sk.w.<worker>`` (one worker: the one holding the session's environment). Nothing comes back
through Celery: a worker claims the job (:func:`.keys.claim`) and answers on the front's inbox
stream (:mod:`.jobs` events). A worker re-validates the text as ``execute/`` validates a
request; a message with other arguments is answered with nothing but a log line, since it
names no front to answer to.

Why these settings:

- JSON only (``accept_content=["json"]``): anyone who reaches Redis can write a message; no
  pickle ever runs.
- No result backend (``task_ignore_result=True``): after a Redis restart, Celery's result
  backend refuses to work until the process restarts (measured, A2). Results travel on our
  own streams.
- ``task_acks_late=True`` and ``worker_prefetch_multiplier=1``. **A measured deviation from the
  issue's ``acks_late=False``**: with early acks, a busy worker of N threads reserves N more
  messages, which wait behind its running jobs while other workers idle (A2: jobs finished at
  4 s on a busy worker while a second one was idle); Celery's own cure
  (``worker_disable_prefetch``) stalls about 0.8 s after each task. Late acks reserve exactly
  the running messages. The issue feared that a redelivered message runs twice: it cannot,
  because a job runs only after its atomic claim (``SET sk:claim:<job> NX``, kept one day,
  longer than the visibility timeout), and a redelivery finds the claim and is dropped.
- ``broker_connection_max_retries=None`` and ``broker_connection_retry_on_startup=True``: a
  worker waits for Redis for ever instead of exiting after 100 attempts.
- The visibility timeout is longer than any run can last (``2 * --execute-timeout +
  --queue-wait``, at least 300 s): an unacked message of a worker that still runs it is never
  handed to another one (which would drop it at the claim anyway).
- The reconnect fix (A2): kombu waits 2, 4, 6 ... up to 30 s between attempts to reach a
  lost broker, and Celery passes no intervals. :class:`QuickReconnect` starts at 0.5 s and
  never waits more than 1 s, so a worker serves again about 0.5 s after Redis is back
  (measured 5 s without it after a 7 s outage, growing to 30 s). It is set per app (through
  the app's ``amqp`` class), not by patching kombu for the whole process.
- Publishing with the anonymous exchange (``exchange=""``, ``routing_key=QUEUE``): the message
  goes straight to the list named QUEUE, so a Redis restarted without kombu's binding keys
  still routes it (measured).
- No remote control, gossip, mingle or events: nothing else is broadcast through Redis.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, Final

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Connection

from . import keys
from .settings import parse_redis_url

if TYPE_CHECKING:
    from ..settings import ServerSettings

#: The one task of the cluster; its only argument is the job message (JSON text).
TASK_NAME: Final = "sk.run_job"
#: The least visibility timeout (seconds) of an unacknowledged message.
MIN_VISIBILITY_TIMEOUT: Final = 300.0
#: The reconnect intervals of :class:`QuickReconnect` (seconds).
RECONNECT_START: Final = 0.5
RECONNECT_STEP: Final = 0.5
RECONNECT_MAX: Final = 1.0
#: How a publish retries when Redis is away: a front answers within about a second.
PUBLISH_RETRY_POLICY: Final = {
    "max_retries": 3,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


class QuickReconnect(Connection):
    """A kombu connection that retries a lost broker every 0.5 to 1 s, not 2 to 30 s.

    Celery's consumer calls ``ensure_connection(errback, max_retries, callback=...)`` without
    intervals, so kombu's defaults apply; only the defaults change here. Pinned to
    ``celery<6`` (pyproject), since this overrides a private kombu method; the Redis restart
    test fails if a new kombu bypasses it.
    """

    def _ensure_connection(
        self,
        errback: Any = None,
        max_retries: int | None = None,
        interval_start: float = RECONNECT_START,
        interval_step: float = RECONNECT_STEP,
        interval_max: float = RECONNECT_MAX,
        callback: Any = None,
        reraise_as_library_errors: bool = True,
        timeout: float | None = None,
    ) -> Any:
        # kombu's stubs say int; kombu sleeps any number of seconds.
        intervals: tuple[Any, Any, Any] = (
            min(interval_start, RECONNECT_START),
            min(interval_step, RECONNECT_STEP),
            min(interval_max, RECONNECT_MAX),
        )
        wait: Any = timeout
        return super()._ensure_connection(
            errback, max_retries, *intervals, callback, reraise_as_library_errors, wait
        )


class _QuickAMQP(AMQP):
    """Celery's AMQP helper whose connections are :class:`QuickReconnect`."""

    Connection = QuickReconnect


def visibility_timeout(settings: ServerSettings) -> float:
    """Seconds before an unacknowledged message goes back to its queue: longer than any run
    (its time budget twice, plus the longest queue wait), at least 300 s."""
    return max(MIN_VISIBILITY_TIMEOUT, 2 * settings.execute_timeout + settings.queue_wait)


def engine_config(settings: ServerSettings) -> dict[str, Any]:
    """The Celery configuration of a cluster process (broker URL with its password)."""
    if not settings.cluster:
        raise ValueError("the task engine needs --cluster redis://[USER:]PASSWORD@HOST:PORT/DB")
    target = parse_redis_url(settings.cluster)
    config: dict[str, Any] = {
        "broker_url": target.secret_url(),
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 2.0,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout(settings),
            "socket_connect_timeout": 2.0,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        "broker_heartbeat": 0,
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": keys.SHARED_QUEUE,
        "task_create_missing_queues": True,
        "task_send_sent_event": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_channel_error_retry": True,
    }
    if target.tls:
        tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        config["broker_use_ssl"] = tls
    return config


def make_engine(settings: ServerSettings) -> Celery:
    """The Celery app of a front or a worker of the cluster ``settings.cluster``.

    Nothing connects yet (Celery connects lazily). A worker registers :data:`TASK_NAME` on
    it; a front only publishes with :func:`publish`.
    """
    app = Celery("sandbox_kernel_cluster", amqp=_QuickAMQP, set_as_current=False)
    app.conf.update(engine_config(settings))
    return app


def publish(app: Celery, job_json: str, queue: str) -> None:
    """Put the job message ``job_json`` on ``queue`` (:data:`~.keys.SHARED_QUEUE` or
    :func:`~.keys.worker_queue`), through the anonymous exchange: it reaches the list named
    ``queue`` even when Redis lost kombu's bindings in a restart.

    Blocking (about 0.4 ms): call it from a thread. Raises kombu's ``OperationalError`` when
    Redis cannot be reached after a few quick retries (about 1 s in all).
    """
    app.send_task(
        TASK_NAME,
        args=(job_json,),
        exchange="",
        routing_key=queue,
        queue=queue,
        declare=[],  # no binding to write or read: the anonymous exchange needs none
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )
