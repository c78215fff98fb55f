"""Cluster benchmark: the four figures of issue 14, side by side with a single server, in one run.

    python bench/bench_cluster.py                 # full run (2 to 3 minutes)
    python bench/bench_cluster.py --quick         # smoke mode (CI): small sizes, under a minute
    python bench/bench_cluster.py --json out.json # the figures as JSON too
    python bench/bench_cluster.py --s3 s3rver     # s3rver (npm) as the S3 server, not moto

One run starts, on loopback: a private ``redis-server`` (password, no persistence), an S3
server with a bucket (``--s3 moto``, the default: ``moto_server``; ``--s3 s3rver``: s3rver from
npm, found as ``$S3RVER``, ``node_modules/.bin/s3rver`` under ``bench/`` or the repository, or
on the PATH), cluster workers of 2 slots (``sandbox-kernel worker``), one front
(``sandbox-kernel serve --cluster``), and a single ``sandbox-kernel serve --workers 2`` beside
them. It measures:

1. latency: a trivial ``true`` (no save) and a carried cell (``echo x >> f``, saved, from the
   previous cell's environment), each kind in phases of its own (blocks of 50 rounds taking
   turns, each after warm-up rounds that are not counted, so that no cell is measured right
   after the other kind's), on the single server and on the front, strictly alternated so that
   the machine's noise falls on both; the difference of the trivial cells is the engine hop,
   the rest of the carried cell's difference is the storage save;
2. throughput: N ``sleep 0.2`` cells at once through the front with 1 worker, then 3 workers;
3. ``kill -9`` of a worker under load: sessions of cells appending to a file, each cell from the
   previous environment; one worker killed midway. The time from the kill to each affected
   session's next success, the 502 answers (and their text), and every session's file checked
   at the end: each cell answered 200 is in it exactly once and in order;
4. a class rush: students arriving over a minute, each creating an environment and running 5
   more cells with think times between them, some over ``execute/stream/?events=queue``
   (queue positions, time to the first output); latency percentiles and errors by status.

Every request carries the token (``Authorization: Bearer``). Every process is stopped at the
end, even on Ctrl-C or a failure, and the scratch directory is removed. The exit status is 1
when the cluster did something wrong (a lost environment, an incomplete file, an error that is
not a documented one); a missed target is only reported.

``--no-cluster`` runs the same drivers against single servers only (the "cluster" column is a
second single server with 6 slots, and no worker is killed): it checks the bench itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cluster_procs as procs

#: What a 502 of the cluster must say (protocol.CLUSTER_LOST_TEXT), compared case-insensitively.
LOST_TEXT = "the cluster lost this request; it may have run"
#: Statuses the cluster documents for a busy or broken moment: 503 (waited --queue-wait in the
#: queue, nothing ran) and 502 (lost after it may have started).
DOCUMENTED = frozenset({502, 503})
#: A request's own deadline: the queue wait (30 s) plus the time budget (60 s), and some.
REQUEST_SECONDS = 120.0
#: Latency rounds run before each phase and not counted: after the first switch, the newest
#: workers' runners, the connections and the caches settle; after the others, what the other
#: kind of cell left behind (a save's aftermath on the worker slows the next cell on 2 cores).
WARM_ROUNDS = 10
#: The latency phases alternate kinds in blocks of this many rounds (trivial, carried,
#: trivial...), so that the machine's drift over the run falls on both kinds alike.
BLOCK_ROUNDS = 50
#: The pause before each latency request (``--settle``). None by default: measured on this
#: machine, a pause of 25 to 100 ms made every cell 3 to 5 ms slower (idle cores wake up
#: slowly) without making the figures steadier.
SETTLE_SECONDS = 0.0
#: The pause before each latency phase: what came before (a burst, the warm-up) is over.
QUIET_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each part measures: the full run, or CI's quick smoke run."""

    latency_samples: int
    throughput_cells: int
    kill_sessions: int
    kill_cells: int
    students: int
    rush_seconds: float
    think: tuple[float, float]
    stream_every: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(30, 24, 10, 5, 30, 10.0, (0.2, 0.8), 3)
        return cls(200, 60, 50, 10, 300, 60.0, (1.0, 4.0), 4)


# -- requests --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A server (single or front) and how to reach it."""

    name: str
    url: str
    token: str
    http: aiohttp.ClientSession

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclasses.dataclass
class Answer:
    """One request's outcome: the HTTP status (0: no answer at all) and its timing."""

    status: int
    body: Any
    sent: float
    done: float
    #: Streamed requests: the largest ``{"queue": N}`` seen, and when the first other frame came.
    queue_max: int | None = None
    first_output: float | None = None

    @property
    def seconds(self) -> float:
        return self.done - self.sent

    @property
    def ok(self) -> bool:
        """Answered 200 and every command exited 0."""
        return self.status == 200 and isinstance(self.body, dict) and self.body.get("status") == 0

    @property
    def environment(self) -> str | None:
        return self.body.get("environment") if isinstance(self.body, dict) else None

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)[:500]

    @property
    def kind(self) -> str:
        """How it is counted: ``200``, ``200 exit N``, another status, or the transport error."""
        if self.status == 200:
            return "200" if self.ok else f"200 exit {self.body.get('status')}"
        return str(self.status) if self.status else str(self.body)


def cell(commands: Sequence[str], environment: str | None = None, save: bool = True) -> Any:
    config: dict[str, Any] = {"commands": list(commands), "save": save}
    if environment:
        config["environment"] = environment
    return config


async def execute(target: Target, config: Any) -> Answer:
    """``POST execute/`` (multipart, like PremierLangage clients)."""
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("config", json.dumps(config))
    sent = time.perf_counter()
    try:
        async with target.http.post(
            target.url + "execute/", data=form, headers=target.headers
        ) as answer:
            status = answer.status
            raw = await answer.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return Answer(0, type(error).__name__, sent, time.perf_counter())
    done = time.perf_counter()
    body: Any = raw
    if status == 200:
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
    return Answer(status, body, sent, done)


async def execute_streamed(target: Target, config: Any) -> Answer:
    """``execute/stream/?events=queue``: the config, an empty archive, then frames until the
    final object or an error frame."""
    sent = time.perf_counter()
    queue_max: int | None = None
    first_output: float | None = None
    try:
        async with target.http.ws_connect(
            target.url + "execute/stream/?events=queue", headers=target.headers
        ) as socket:
            await socket.send_str(json.dumps(config))
            await socket.send_bytes(b"")
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(message.data)
                if "queue" in frame and len(frame) == 1:
                    queue_max = max(queue_max or 0, int(frame["queue"]))
                    continue
                if first_output is None:
                    first_output = time.perf_counter()
                if "error" in frame:
                    return _streamed(
                        frame["error"], frame.get("text", ""), sent, queue_max, first_output
                    )
                if "status" in frame and "stream" not in frame:
                    return _streamed(200, frame, sent, queue_max, first_output)
    except aiohttp.WSServerHandshakeError as error:
        return Answer(error.status, error.message, sent, time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        return Answer(0, type(error).__name__, sent, time.perf_counter())
    return Answer(0, "closed without a final frame", sent, time.perf_counter())


def _streamed(
    status: int, body: Any, sent: float, queue_max: int | None, first_output: float | None
) -> Answer:
    return Answer(status, body, sent, time.perf_counter(), queue_max, first_output)


async def get_text(target: Target, path: str) -> tuple[int, str]:
    try:
        async with target.http.get(target.url + path, headers=target.headers) as answer:
            return answer.status, await answer.text(errors="replace")
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return 0, type(error).__name__


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.5 is close to the median)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> str:
    return "none" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def sec(seconds: float) -> str:
    return "none" if math.isnan(seconds) else f"{seconds:.2f} s"


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- 1. latency ------------------------------------------------------------------------------------


async def latency(
    single: Target, front: Target, samples: int, place: procs.Place | None, settle: float
) -> dict[str, Any]:
    """Trivial cells and carried cells in phases of their own (blocks of
    :data:`BLOCK_ROUNDS`, each after uncounted warm-up rounds), single and front strictly
    alternated (the order flips every round, so neither always goes second). With a cluster,
    the S3 requests of each kind of cell are counted in the S3 server's log, and a PUT is
    timed from here for scale."""
    times: dict[str, dict[str, list[float]]] = {}
    s3: dict[str, collections.Counter[str]] | None = {}
    tasks: dict[str, list[float]] = {"trivial": [], "carried": []}
    uuids: dict[str, str | None] = {}

    def trivial(target: Target) -> Any:
        return cell(["true"], save=False)

    def carried(target: Target) -> Any:
        return cell(["echo x >> f"], uuids[target.name])

    blocks = [min(BLOCK_ROUNDS, samples - start) for start in range(0, samples, BLOCK_ROUNDS)]
    for rounds in blocks:
        for kind, config_of in (("trivial", trivial), ("carried", carried)):
            if kind == "carried" and not uuids:
                for target in (single, front):
                    first = await _checked(execute(target, cell(["echo 1 > f"])), target)
                    uuids[target.name] = first.environment
            await _rounds((single, front), config_of, WARM_ROUNDS, settle, uuids)
            await asyncio.sleep(QUIET_SECONDS)
            offset = place.s3_log_offset() if place else 0
            task_offsets = place.worker_log_offsets() if place else {}
            measured = await _rounds((single, front), config_of, rounds, settle, uuids)
            for name, seconds in measured.items():
                times.setdefault(kind, {}).setdefault(name, []).extend(seconds)
            if place is not None:
                await asyncio.sleep(0.2)  # an S3 server logs a request just after answering it
                counts = place.s3_requests_since(offset)
                if counts is None or s3 is None:
                    s3 = None  # its log does not show requests
                else:
                    s3[kind] = s3.get(kind, collections.Counter()) + counts
                tasks[kind] += place.task_seconds_since(task_offsets)
    figures = _latency_figures(single.name, front.name, times["trivial"], times["carried"])
    per_cell = None
    if s3 is not None:
        per_cell = {
            kind: {what: count / samples for what, count in sorted(counts.items())}
            for kind, counts in s3.items()
        }
    figures.update(settle=settle, blocks=len(blocks), s3_requests_per_front_cell=per_cell)
    if place is not None:
        figures.update({f"{kind}_task_median": percentile(tasks[kind], 0.5) for kind in tasks})
        figures["s3_put_median"] = await asyncio.to_thread(_time_puts, place, 30)
    return figures


async def _rounds(
    targets: tuple[Target, Target],
    config_of: Callable[[Target], Any],
    rounds: int,
    settle: float,
    uuids: dict[str, str | None],
) -> dict[str, list[float]]:
    """``rounds`` requests to each target, alternated, the order flipped every round, each
    after ``settle`` seconds of pause; each target's times."""
    times: dict[str, list[float]] = {target.name: [] for target in targets}
    for round_index in range(rounds):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for target in order:
            await asyncio.sleep(settle)
            answer = await _checked(execute(target, config_of(target)), target)
            times[target.name].append(answer.seconds)
            uuids[target.name] = answer.environment or uuids.get(target.name)
    return times


def _time_puts(place: procs.Place, count: int) -> float:
    """The median of ``count`` 100-byte PUTs to the S3 server from this process (boto3)."""
    client = place.s3_client()
    seconds = []
    for index in range(count):
        started = time.perf_counter()
        client.put_object(Bucket=place.bucket, Key=f"bench-probe/{index}", Body=b"x" * 100)
        seconds.append(time.perf_counter() - started)
    return percentile(seconds, 0.5)


def _latency_figures(
    single: str,
    front: str,
    trivial: dict[str, list[float]],
    carried: dict[str, list[float]],
) -> dict[str, Any]:
    figure = {
        f"{kind}_{which}_{stat}": percentile(values[name], fraction)
        for kind, values in (("trivial", trivial), ("carried", carried))
        for which, name in (("single", single), ("front", front))
        for stat, fraction in (("median", 0.5), ("p90", 0.9))
    }
    hop = figure["trivial_front_median"] - figure["trivial_single_median"]
    hop_p90 = figure["trivial_front_p90"] - figure["trivial_single_p90"]
    save_single = figure["carried_single_median"] - figure["trivial_single_median"]
    save_front = figure["carried_front_median"] - figure["trivial_front_median"]
    figure.update(
        samples=len(trivial[single]),
        engine_hop=hop,
        engine_hop_p90=hop_p90,
        save_single=save_single,
        save_front=save_front,
        storage_extra=save_front - save_single,
        carried_ratio=figure["carried_front_median"] / figure["carried_single_median"],
        carried_ratio_p90=figure["carried_front_p90"] / figure["carried_single_p90"],
    )
    return figure


async def _checked(pending: Awaitable[Answer], target: Target) -> Answer:
    answer = await pending
    if not answer.ok:
        raise BenchError(f"{target.name} answered {answer.kind}: {answer.text[:300]}")
    return answer


class BenchError(RuntimeError):
    """The cluster (or the single server) did something wrong: the text says what."""


# -- 2. throughput ---------------------------------------------------------------------------------


async def burst(target: Target, count: int) -> dict[str, Any]:
    """``count`` cells of ``sleep 0.2`` sent at once; the wall time until the last answer."""
    await asyncio.gather(*(execute(target, cell(["true"], save=False)) for _ in range(4)))
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(execute(target, cell(["sleep 0.2"], save=False)) for _ in range(count))
    )
    wall = time.perf_counter() - started
    kinds = collections.Counter(answer.kind for answer in answers)
    return {"cells": count, "wall": wall, "answers": dict(kinds)}


# -- 3. kill -9 under load -------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One cell of a kill-test session: the number it appends, and what came back."""

    number: int
    answer: Answer


@dataclasses.dataclass
class Session:
    index: int
    records: list[Record] = dataclasses.field(default_factory=list)
    environment: str | None = None
    #: The environment it was at when the worker was killed, and whether the victim held it.
    on_victim: bool = False


Killer = Callable[[list[Session]], Awaitable[float | None]]


async def kill_test(
    front: Target, sessions_count: int, cells: int, killer: Killer
) -> dict[str, Any]:
    """Sessions of ``echo N >> log`` cells, each from its previous saved environment (after a
    502 too); ``killer`` runs once half of the cells are answered and returns the kill's time."""
    sessions = [Session(index) for index in range(sessions_count)]
    half = sessions_count * cells // 2
    answered = 0
    kill_time: float | None = None
    kill_started = asyncio.Event()
    kill_done: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()

    async def kill_when_half() -> None:
        await kill_started.wait()
        try:
            kill_done.set_result(await killer(sessions))
        except BaseException as error:
            kill_done.set_exception(error)
            raise

    async def run(session: Session) -> None:
        nonlocal answered
        for number in range(1, cells + 1):
            answer = await execute(front, cell([f"echo {number} >> log"], session.environment))
            session.records.append(Record(number, answer))
            if answer.ok:
                session.environment = answer.environment
            answered += 1
            if answered >= half:
                kill_started.set()

    killing = asyncio.ensure_future(kill_when_half())
    started = time.perf_counter()
    await asyncio.gather(*(run(session) for session in sessions))
    wall = time.perf_counter() - started
    kill_started.set()
    kill_time = await kill_done
    await killing
    figures = _kill_figures(sessions, kill_time)
    figures.update(await _verify_logs(front, sessions))
    figures.update(sessions=sessions_count, cells_per_session=cells, wall=wall)
    return figures


def _kill_figures(sessions: list[Session], kill_time: float | None) -> dict[str, Any]:
    answers = [record.answer for session in sessions for record in session.records]
    lost = [answer for answer in answers if answer.status == 502]
    figures: dict[str, Any] = {
        "answers": dict(collections.Counter(answer.kind for answer in answers)),
        "texts": _texts(answers),
        "answers_502": len(lost),
        "answers_502_with_text": sum(LOST_TEXT in answer.text.lower() for answer in lost),
        "killed": kill_time is not None,
    }
    if kill_time is None:
        return figures
    ok_seconds = [answer.seconds for answer in answers if answer.ok]
    recoveries, detections, retries, unrecovered = [], [], [], 0
    for session in sessions:
        had_502 = any(record.answer.status == 502 for record in session.records)
        if not (had_502 or session.on_victim):
            continue
        after = [r.answer for r in session.records if r.answer.done > kill_time]
        if not after:
            continue  # finished before the kill: not affected
        detections += [a.done - kill_time for a in after if a.status == 502]
        retries += _retry_times(after)
        success = next((a for a in after if a.ok), None)
        if success is None:
            unrecovered += 1
        else:
            recoveries.append(success.done - kill_time)
    figures.update(
        affected_sessions=len(recoveries) + unrecovered,
        affected_unrecovered=unrecovered,
        recovery_max=max(recoveries, default=float("nan")),
        recovery_median=percentile(recoveries, 0.5),
        detection_max=max(detections, default=float("nan")),
        retry_max=max(retries, default=float("nan")),
        cell_p50=percentile(ok_seconds, 0.5),
        cell_p90=percentile(ok_seconds, 0.9),
    )
    return figures


def _texts(answers: Iterable[Answer]) -> dict[str, str]:
    """The first text of each kind of answer other than a plain 200 (what a refusal said)."""
    texts: dict[str, str] = {}
    for answer in answers:
        if answer.kind != "200":
            texts.setdefault(answer.kind, answer.text[:400])
    return texts


def _retry_times(answers: list[Answer]) -> list[float]:
    """From each 502 to the session's next success (its next cell, from the same base)."""
    times = []
    for index, answer in enumerate(answers):
        if answer.status == 502:
            success = next((later for later in answers[index + 1 :] if later.ok), None)
            if success is not None:
                times.append(success.done - answer.done)
    return times


async def _verify_logs(front: Target, sessions: list[Session]) -> dict[str, Any]:
    """Every session's last file: each ok cell exactly once, in order, 502'd cells at most once
    where they were sent, nothing else. And every environment answered 200 can be read."""
    limit = asyncio.Semaphore(8)

    async def read(uuid: str) -> tuple[int, str]:
        async with limit:
            return await get_text(front, f"files/{uuid}/log/")

    complete, problems, appeared_502 = 0, [], 0
    last = await asyncio.gather(*(read(s.environment) for s in sessions if s.environment))
    for session, (status, text) in zip((s for s in sessions if s.environment), last, strict=True):
        if status != 200:
            problems.append(
                f"session {session.index}: files/{session.environment}/log/ → {status} {text[:200]}"
            )
            continue
        verdict, seen_502 = _check_log(session, text.split())
        appeared_502 += seen_502
        if verdict is None:
            complete += 1
        else:
            problems.append(f"session {session.index}: {verdict}")
    saved = [r.answer.environment for s in sessions for r in s.records if r.answer.ok]
    readable = await asyncio.gather(*(read(uuid) for uuid in saved if uuid))
    lost = [uuid for uuid, (status, _) in zip(saved, readable, strict=True) if status != 200]
    problems += [f"environment {uuid} answered 200 but cannot be read" for uuid in lost[:10]]
    return {
        "logs_complete": complete,
        "logs_checked": len(last),
        "environments_saved": len(saved),
        "environments_lost": len(lost),
        "cells_502_in_logs": appeared_502,
        "log_problems": problems,
    }


def _check_log(session: Session, lines: list[str]) -> tuple[str | None, int]:
    """None if ``lines`` is what the session's answers allow (and how many 502'd cells are in
    it), else what is wrong."""
    last_ok = max((i for i, r in enumerate(session.records) if r.answer.ok), default=-1)
    position, seen_502 = 0, 0
    for record in session.records[: last_ok + 1]:
        here = position < len(lines) and lines[position] == str(record.number)
        if record.answer.ok:
            if not here:
                return f"cell {record.number} (answered 200) is missing from {lines}", seen_502
            position += 1
        elif here and record.answer.status not in (0, 503) and record.answer.status // 100 != 4:
            position += 1  # a 502 (or an unknown end) may have run
            seen_502 += 1
    if position != len(lines):
        return f"unexpected lines {lines[position:]} after {lines[:position]}", seen_502
    return None, seen_502


# -- 4. the class rush -----------------------------------------------------------------------------

STUDENT_CELLS: tuple[tuple[str, ...], ...] = (
    ("mkdir -p work", "printf 'int main(void) { return 0; }\\n' > work/main.c", "echo created"),
    ("echo 'cell 1' >> work/notes", "wc -l < work/notes"),
    ("seq 1 2000 | awk '{ s += $1 } END { print s }'",),
    ("echo 'cell 3' >> work/notes", "ls -l work | wc -l"),
    ("echo running", "echo 'cell 4' >> work/notes", "wc -c < work/notes"),
    ("sort work/notes | uniq -c | tail -n 3",),
)


async def rush(front: Target, sizes: Sizes, seed: int = 14) -> dict[str, Any]:
    """Students arriving over ``rush_seconds``; each creates an environment and runs 5 more
    cells from it, thinking between cells; every ``stream_every``-th student streams."""
    generator = random.Random(seed)
    plan = [
        (
            generator.uniform(0, sizes.rush_seconds),
            [generator.uniform(*sizes.think) for _ in STUDENT_CELLS],
        )
        for _ in range(sizes.students)
    ]
    answers: list[tuple[bool, Answer]] = []
    started = time.perf_counter()

    async def student(index: int, arrival: float, thinks: list[float]) -> None:
        streamed = index % sizes.stream_every == 0
        send = execute_streamed if streamed else execute
        await asyncio.sleep(arrival)
        environment: str | None = None
        for number, commands in enumerate(STUDENT_CELLS):
            if number:
                await asyncio.sleep(thinks[number])
            answer = await send(front, cell(commands, environment))
            answers.append((streamed, answer))
            if answer.ok:
                environment = answer.environment

    await asyncio.gather(*(student(i, arrival, thinks) for i, (arrival, thinks) in enumerate(plan)))
    return _rush_figures(answers, sizes, time.perf_counter() - started)


def _rush_figures(answers: list[tuple[bool, Answer]], sizes: Sizes, wall: float) -> dict[str, Any]:
    seconds = [answer.seconds for _, answer in answers]
    streamed = [answer for was_streamed, answer in answers if was_streamed]
    waits = [a.first_output - a.sent for a in streamed if a.first_output is not None]
    kinds = collections.Counter(answer.kind for _, answer in answers)
    undocumented = {
        kind: count
        for kind, count in kinds.items()
        if kind != "200" and kind not in {str(s) for s in DOCUMENTED}
    }
    return {
        "students": sizes.students,
        "arrivals_over": sizes.rush_seconds,
        "cells": len(answers),
        "wall": wall,
        "rate": len(answers) / wall,
        "p50": percentile(seconds, 0.5),
        "p95": percentile(seconds, 0.95),
        "max": max(seconds, default=float("nan")),
        "streamed_cells": len(streamed),
        "queue_max": max((a.queue_max for a in streamed if a.queue_max is not None), default=None),
        "queue_frames_cells": sum(a.queue_max is not None for a in streamed),
        "first_output_p95": percentile(waits, 0.95),
        "first_output_max": max(waits, default=float("nan")),
        "answers": dict(kinds),
        "texts": _texts([answer for _, answer in answers]),
        "undocumented": undocumented,
    }


# -- heartbeats (design B12.3) ---------------------------------------------------------------------


class HeartbeatWatch:
    """Polls the workers' heartbeat TTLs: the longest gap between two beats is about the key's
    full TTL minus the lowest TTL seen (within one poll)."""

    POLL = 0.02

    def __init__(self, place: procs.Place, names: Iterable[str]) -> None:
        self.client = place.redis_client()
        self.names = list(names)
        self.lowest: dict[str, int] = {}
        self.highest: dict[str, int] = {}
        self.dropped: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def drop(self, name: str) -> None:
        """Stop counting ``name`` (the worker killed on purpose)."""
        self.dropped.add(name)

    def __enter__(self) -> HeartbeatWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL):
            names = [n for n in self.names if n not in self.dropped]
            try:
                pipeline = self.client.pipeline(transaction=False)
                for name in names:
                    pipeline.pttl(f"sk:worker:{name}")
                ttls = pipeline.execute()
            except Exception:  # a missed poll only loses precision
                continue
            for name, ttl in zip(names, ttls, strict=True):
                if name in self.dropped:
                    continue
                value = int(ttl) if int(ttl) >= 0 else 0  # -2: gone, the worst gap
                self.lowest[name] = min(self.lowest.get(name, value), value)
                self.highest[name] = max(self.highest.get(name, value), value)

    def gaps(self) -> dict[str, float]:
        """Each watched worker's longest gap between two beats, in seconds."""
        return {
            name: round((self.highest[name] - self.lowest[name]) / 1000 + self.POLL, 3)
            for name in self.lowest
            if name not in self.dropped
        }


# -- the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cluster:
    """What the run started, and how to grow it, kill a worker and watch heartbeats."""

    place: procs.Place | None
    single: procs.Server
    front: procs.Server
    workers: dict[str, procs.Process]
    #: In --no-cluster mode: a single server of 2 slots standing in for "1 worker x 2".
    small: procs.Server | None = None


def start_cluster(place: procs.Place, no_cluster: bool) -> Cluster:
    """Redis, the S3 server, one worker, the front and the single server (the 2 more workers
    come after the 1-worker throughput)."""
    if no_cluster:
        single = place.start_single("single", 2)
        stand_in = place.start_single("stand-in", 6)
        single.wait_ready()
        stand_in.wait_ready()
        return Cluster(None, single, stand_in, {}, small=single)
    programs = procs.require_prerequisites(place.s3)
    place.start_redis(programs.redis)
    place.start_s3(programs)
    single = place.start_single("single", 2)
    workers = {"w1": place.start_worker("w1")}
    front = place.start_front("front")
    place.wait_workers(workers)
    single.wait_ready()
    front.wait_ready(slots=2)
    return Cluster(place, single, front, workers)


def grow_cluster(cluster: Cluster) -> None:
    if cluster.place is None:
        return
    more = {name: cluster.place.start_worker(name) for name in ("w2", "w3")}
    cluster.place.wait_workers(more)
    cluster.workers.update(more)
    cluster.front.wait_ready(slots=6)


def make_killer(cluster: Cluster, watch: HeartbeatWatch | None, figures: dict[str, Any]) -> Killer:
    """The ``kill -9`` of the busiest worker (by its heartbeat), after noting which sessions'
    environments it held (``sk:env:<uuid>``)."""

    async def kill(sessions: list[Session]) -> float | None:
        place = cluster.place
        if place is None:
            return None
        client = place.redis_client()
        try:
            victim = await _busy_worker(client, list(cluster.workers))
            holders = _holders(client, [s.environment for s in sessions])
        finally:
            client.close()
        process = cluster.workers.pop(victim)
        if watch is not None:
            watch.drop(victim)
        for session in sessions:
            session.on_victim = victim in holders.get(session.environment or "", set())
        killed_at = time.perf_counter()
        process.remember_children()
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.popen.wait)
        figures["victim"] = victim
        figures["victim_sandboxes_left"] = await asyncio.to_thread(_left_after, process)
        return killed_at

    return kill


def _unacked(place: procs.Place) -> dict[str, int]:
    """The engine's messages taken by a worker and never acknowledged (kombu's ``unacked``
    hash), by queue: after a kill, the dead worker's. They come back only after the
    visibility timeout (at least 300 s)."""
    client = place.redis_client()
    try:
        held = client.hvals("unacked")
    finally:
        client.close()
    queues: collections.Counter[str] = collections.Counter()
    for raw in held:
        try:
            queues[str(json.loads(raw)[2])] += 1
        except (ValueError, IndexError, TypeError):
            queues["?"] += 1
    return dict(queues)


async def _busy_worker(client: Any, names: list[str], patience: float = 2.0) -> str:
    """The worker whose heartbeat lists the most running jobs, as soon as one lists any
    (within ``patience``; else the last busiest): a kill must catch jobs in flight."""
    deadline = time.monotonic() + patience
    while True:
        beats = client.mget([f"sk:worker:{name}" for name in names])
        running = {
            name: len(json.loads(beat).get("jobs", [])) if beat else -1
            for name, beat in zip(names, beats, strict=True)
        }
        busiest = max(names, key=lambda name: running[name])
        if running[busiest] > 0 or time.monotonic() > deadline:
            return busiest
        await asyncio.sleep(0.01)


def _holders(client: Any, environments: list[str | None]) -> dict[str, set[str]]:
    known = [uuid for uuid in environments if uuid]
    pipeline = client.pipeline(transaction=False)
    for uuid in known:
        pipeline.smembers(f"sk:env:{uuid.lower()}")
    members = pipeline.execute()
    return {uuid: {m.decode() for m in found} for uuid, found in zip(known, members, strict=True)}


def _left_after(process: procs.Process, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while process.survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(process.survivors())


async def measure(cluster: Cluster, sizes: Sizes, settle: float) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        single = Target("single", cluster.single.url, cluster.single.token, http)
        front = Target("front", cluster.front.url, cluster.front.token, http)
        results: dict[str, Any] = {}
        small = front
        if cluster.small is not None:
            small = Target("small", cluster.small.url, cluster.small.token, http)
        _say("throughput, 1 worker x 2 slots ...")
        results["throughput_1x2"] = await burst(small, sizes.throughput_cells)
        await asyncio.to_thread(grow_cluster, cluster)
        _say("throughput, 3 workers x 2 slots ...")
        results["throughput_3x2"] = await burst(front, sizes.throughput_cells)
        _say(f"latency, {sizes.latency_samples} rounds, single and front alternated ...")
        results["latency"] = await latency(
            single, front, sizes.latency_samples, cluster.place, settle
        )
        place = cluster.place
        names = list(cluster.workers)
        _say(f"class rush, {sizes.students} students over {sizes.rush_seconds:g} s ...")
        with _watching(place, names) as watch:
            offsets = place.worker_log_offsets() if place else {}
            results["rush"] = await rush(front, sizes)
            results["rush"]["heartbeat_gaps"] = watch.gaps() if watch else {}
            results["rush"]["workers"] = place.worker_events_since(offsets) if place else {}
        _say(f"kill -9 under load, {sizes.kill_sessions} sessions x {sizes.kill_cells} cells ...")
        kill: dict[str, Any] = {}
        with _watching(place, names) as watch:
            offsets = place.worker_log_offsets() if place else {}
            killer = make_killer(cluster, watch, kill)
            kill.update(await kill_test(front, sizes.kill_sessions, sizes.kill_cells, killer))
            kill["heartbeat_gaps"] = watch.gaps() if watch else {}
            kill["workers"] = place.worker_events_since(offsets) if place else {}
            kill["unacked"] = _unacked(place) if place else {}
        results["kill"] = kill
    return results


class _NoWatch:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _watching(place: procs.Place | None, names: list[str]) -> Any:
    return HeartbeatWatch(place, names) if place is not None else _NoWatch()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the report ------------------------------------------------------------------------------------


def report(results: dict[str, Any], quick: bool, no_cluster: bool) -> list[str]:
    """Print the tables; return what the cluster did wrong (empty when nothing)."""
    wrong: list[str] = []
    what = "a second single server of 6 slots (--no-cluster)" if no_cluster else "3 workers x 2"
    print(
        f"machine: {os.cpu_count()} cores; mode: {'quick' if quick else 'full'}; "
        f"S3: {results['s3_server']}; cluster: {what}\n"
    )
    _print_table(*_latency_table(results["latency"], results["s3_server"]))
    _print_table(*_throughput_table(results["throughput_1x2"], results["throughput_3x2"], wrong))
    _print_table(*_kill_table(results["kill"], wrong))
    _print_table(*_rush_table(results["rush"], wrong))
    return wrong


Table = tuple[list[str], list[list[str]]]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def _latency_table(figure: dict[str, Any], s3_server: str) -> Table:
    rounds = f"{figure['samples']} rounds alternated, in {figure['blocks']} blocks of each kind"
    if figure["settle"]:
        rounds += f", {figure['settle'] * 1000:g} ms apart"
    header = [f"latency ({rounds})", "single (2 slots)", "front", "difference", "target"]
    rows = []
    for kind, label, target in (
        ("trivial", "trivial `true`, not saved", "<= +5 ms"),
        ("carried", "carried `echo x >> f`, saved", "<= 2x"),
    ):
        for stat, suffix in (("median", ""), ("p90", "_p90")):
            if kind == "trivial":
                hop = figure[f"engine_hop{suffix}"]
                difference, ok = f"{hop * 1000:+.1f} ms (engine hop)", hop <= 0.005
            else:
                ratio = figure[f"carried_ratio{suffix}"]
                difference, ok = f"{ratio:.2f}x", ratio <= 2
            single, front = figure[f"{kind}_single_{stat}"], figure[f"{kind}_front_{stat}"]
            verdict = f"{target}: {met(ok)}" if stat == "median" else ""
            rows.append([f"{label}: {stat}", ms(single), ms(front), difference, verdict])
    storage = f"{figure['storage_extra'] * 1000:+.1f} ms (storage)"
    saves = [ms(figure["save_single"]), ms(figure["save_front"])]
    rows.append(["the save (carried - trivial), medians", *saves, storage, ""])
    if "carried_task_median" in figure:
        task_trivial, task_carried = figure["trivial_task_median"], figure["carried_task_median"]
        on_worker = f"{ms(task_trivial)} / {ms(task_carried)}"
        rows.append(["a job on its worker (Celery's task time), trivial / carried", "", on_worker])
        rows[-1] += [f"{(task_carried - task_trivial) * 1000:+.1f} ms (save on the worker)", ""]
        outside = figure["trivial_front_median"] - task_trivial
        rows.append(["front trivial minus its task time (HTTP, engine)", "", ms(outside), "", ""])
    if "s3_put_median" in figure:  # a cluster ran
        rows += _s3_rows(figure, s3_server)
    return header, rows


def _s3_rows(figure: dict[str, Any], s3_server: str) -> list[list[str]]:
    """The S3 requests of a front's cell (n/a when the server's log does not show them), and
    one PUT's time."""
    counted = figure["s3_requests_per_front_cell"]
    rows = []
    for kind in ("trivial", "carried"):
        requests = "n/a (the S3 server's log shows no requests)"
        if counted is not None:
            found = counted.get(kind, {})
            requests = ", ".join(f"{count:.2g} {what}" for what, count in found.items()) or "none"
        rows.append([f"S3 requests per front {kind} cell", "", requests, "", ""])
    put = ms(figure["s3_put_median"])
    rows.append([f"one 100 B PUT to {s3_server} from the bench (boto3), median", "", put, "", ""])
    return rows


def _throughput_table(small: dict[str, Any], large: dict[str, Any], wrong: list[str]) -> Table:
    ratio = small["wall"] / large["wall"]
    header = [f"throughput: {large['cells']} x `sleep 0.2` at once", "1 worker x 2"]
    header += ["3 workers x 2", "ratio", "target"]
    walls = [f"{small['wall']:.2f} s", f"{large['wall']:.2f} s"]
    rows = [
        ["wall time", *walls, f"{ratio:.2f}x", f">= 2.5x: {met(ratio >= 2.5)}"],
        ["answers", _kinds(small["answers"]), _kinds(large["answers"]), "", "all 200"],
    ]
    for label, figure in (("1 worker", small), ("3 workers", large)):
        if set(figure["answers"]) != {"200"}:
            wrong.append(
                f"throughput with {label}: answers {figure['answers']} (all should be 200)"
            )
    return header, rows


def _kill_table(figure: dict[str, Any], wrong: list[str]) -> Table:
    size = f"{figure['sessions']} sessions x {figure['cells_per_session']} cells"
    header = [f"kill -9 of a worker under load: {size}", "value", "target"]
    with_text = f"{figure['answers_502_with_text']} of {figure['answers_502']}"
    rows = [
        ["answers", _kinds(figure["answers"]), "200 or 502"],
        [f'502 answers saying "{LOST_TEXT}"', with_text, "all"],
    ]
    if figure["killed"]:
        recovery = figure["recovery_max"]
        times = f"{sec(recovery)} ({sec(figure['recovery_median'])})"
        cells = f"{sec(figure['cell_p50'])} / {sec(figure['cell_p90'])}"
        rows += [
            ["worker killed", figure["victim"], ""],
            [
                "affected sessions (a 502, or their environment on it)",
                str(figure["affected_sessions"]),
                "",
            ],
            ["kill to their next success: max (median)", times, _recovery_target(recovery)],
            ["kill to a 502: max", sec(figure["detection_max"]), ""],
            ["a 502 to the session's next success: max", sec(figure["retry_max"]), ""],
            ["a cell in this test (queue included): p50 / p90", cells, ""],
            ["processes of the killed worker left", str(figure["victim_sandboxes_left"]), "0"],
        ]
    rows += [
        [
            "files complete (200 cells once, in order)",
            f"{figure['logs_complete']} of {figure['logs_checked']}",
            "all",
        ],
        [
            "environments answered 200, then lost",
            f"{figure['environments_lost']} of {figure['environments_saved']}",
            "0",
        ],
        ["502'd cells found in the files", str(figure["cells_502_in_logs"]), "may be"],
        ["longest gap between heartbeats", _gap(figure["heartbeat_gaps"]), "< 0.5 s"],
        ["workers' logs", _events(figure["workers"]), ""],
        [
            "messages held unacknowledged at the end (kombu `unacked`)",
            _kinds(figure["unacked"]),
            "",
        ],
    ]
    undocumented = {k: v for k, v in figure["answers"].items() if k not in ("200", "502")}
    if undocumented:
        wrong.append(f"kill test: answers other than 200 and 502: {undocumented}")
        wrong += [f"kill test: a {kind} said: {text}" for kind, text in figure["texts"].items()]
    if figure["answers_502_with_text"] != figure["answers_502"]:
        wrong.append("kill test: a 502 without the cluster's lost-request text")
    if figure["killed"] and figure["affected_unrecovered"]:
        wrong.append(
            f"kill test: {figure['affected_unrecovered']} affected sessions never recovered"
        )
    if figure["killed"] and figure["victim_sandboxes_left"]:
        wrong.append(
            f"kill test: {figure['victim_sandboxes_left']} processes of the killed worker lived"
        )
    wrong += [f"kill test: {problem}" for problem in figure["log_problems"]]
    return header, rows


def _rush_table(figure: dict[str, Any], wrong: list[str]) -> Table:
    who = f"{figure['students']} students over {figure['arrivals_over']:g} s, 6 cells each"
    header = [f"class rush: {who}", "value", "target"]
    percentiles = " / ".join(ms(figure[key]) for key in ("p50", "p95", "max"))
    queue = f"{figure['queue_max']} ({figure['queue_frames_cells']} of {figure['streamed_cells']})"
    first = f"{ms(figure['first_output_p95'])} / {ms(figure['first_output_max'])}"
    rows = [
        [
            "cells answered",
            f"{figure['cells']} in {figure['wall']:.1f} s ({figure['rate']:.1f}/s)",
            "",
        ],
        ["cell latency p50 / p95 / max", percentiles, ""],
        ["most jobs ahead in the queue (streamed cells that got queue frames)", queue, ""],
        ["streamed cells, time to the first output: p95 / max", first, ""],
        ["answers", _kinds(figure["answers"]), "no errors but 502/503"],
        ["longest gap between heartbeats", _gap(figure["heartbeat_gaps"]), "< 0.5 s"],
        ["workers' logs", _events(figure["workers"]), ""],
    ]
    if figure["undocumented"]:
        wrong.append(f"class rush: undocumented answers {figure['undocumented']}")
        wrong += [f"class rush: a {kind} said: {text}" for kind, text in figure["texts"].items()]
    return header, rows


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{count} x {kind}" for kind, count in sorted(kinds.items()))


def _recovery_target(recovery: float) -> str:
    return "<= 2 s: " + ("no session affected" if math.isnan(recovery) else met(recovery <= 2))


def _events(events: dict[str, int]) -> str:
    return ", ".join(f"{count} {event}" for event, count in events.items()) or "n/a"


def _gap(gaps: dict[str, float]) -> str:
    if not gaps:
        return "n/a"
    name = max(gaps, key=lambda name: gaps[name])
    return f"{gaps[name]:.2f} s ({name})"


# -- main ------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """``value`` with NaN (a figure that had no sample) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM end the run through the ``finally`` that stops every process (SIGINT
    even when the bench was started with it ignored, as a shell does for ``cmd &``)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (CI): small sizes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--no-cluster", action="store_true", help="drivers against single servers only"
    )
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep the processes' logs in DIR")
    parser.add_argument(
        "--s3",
        choices=procs.S3_SERVERS,
        default="moto",
        help="the S3 server: moto_server (default, CI's) or s3rver from npm (faster per object)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS * 1000,
        metavar="MS",
        help=f"pause before each latency request (default {SETTLE_SECONDS * 1000:g} ms)",
    )
    args = parser.parse_args()
    sizes = Sizes.of(args.quick)
    _stop_on_signals()
    place = procs.Place(args.s3)
    results: dict[str, Any] | None = None
    try:
        _say(f"starting the processes in {place.root} ...")
        cluster = start_cluster(place, args.no_cluster)
        results = asyncio.run(measure(cluster, sizes, args.settle / 1000))
        results["s3"] = "none" if args.no_cluster else args.s3
        results["s3_server"] = "none (--no-cluster)" if args.no_cluster else place.s3_label
    except (procs.Missing, procs.StartFailed, BenchError) as error:
        print(f"bench_cluster: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_cluster: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        for problem in place.close(args.logs):
            print(f"bench_cluster: {problem}", file=sys.stderr)
    wrong = report(results, args.quick, args.no_cluster)
    if args.json:
        results["wrong"] = wrong
        args.json.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
    for problem in wrong:
        print(f"WRONG: {problem}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
