"""Every Redis key, TTL and Lua script of the cluster, in one place (design B3, B4).

All keys start with ``sk:`` (and the Celery queues with ``sk.``), so one Redis can serve other
applications too. A key is only ever built here, from a job id or a name checked against
:data:`JOB_ID_RE` or :data:`NAME_RE`: text from a message can never reach another key space.

The claim (:func:`claim`) is the one rule that makes the cluster safe. A job runs only after
``SET sk:claim:<job> <owner> NX`` succeeded for a worker; a front that stops waiting claims the
job itself (:func:`give_up`), so either a worker runs it or the front answers 503 (nothing
ran), never both. Fallback copies and late redeliveries of a message find the key and are
dropped, which is why the claim outlives any redelivery (:data:`CLAIM_TTL_MS`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from ...protocol import is_uuid

if TYPE_CHECKING:
    import redis
    import redis.asyncio

PREFIX: Final = "sk:"

#: A job id: a uuid4 in hex, as the front makes them (``uuid.uuid4().hex``).
JOB_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
#: A worker's or a front's name (``<hostname>-<pid>`` by default): no ``:``, so no name can
#: pass for the fronts' reserved owners (:data:`OWNER_GAVE_UP`), and no space or control
#: character, so it is safe in keys, queue names and logs.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# Timings and sizes.
#: A claim outlives the broker's visibility timeout (at least 300 s) and any late
#: redelivery of the message, which must find it and be dropped (design A2, B4): one day.
CLAIM_TTL_MS: Final = 24 * 3600 * 1000
#: A worker refreshes its heartbeat this often ...
HEARTBEAT_INTERVAL: Final = 0.25
#: ... and the key lives this long: a worker that stopped beating is seen dead within 1 s.
HEARTBEAT_TTL_MS: Final = 1000
#: Replies kept per front inbox and messages per worker control stream (``XADD MAXLEN ~``).
INBOX_MAXLEN: Final = 10_000
CONTROL_MAXLEN: Final = 1_000
#: An uploaded archive up to this size travels in Redis (``sk:upload:<job>``), larger ones
#: through the bucket; either is deleted after the run, and the Redis copy expires anyway.
UPLOAD_INLINE_MAX: Final = 1024**2
UPLOAD_TTL_S: Final = 120

# Owners a front writes in a claim: reserved, since a worker's name cannot contain ``:``.
OWNER_GAVE_UP: Final = "front:gave-up"
OWNER_CANCELLED: Final = "front:cancelled"
FRONT_OWNERS: Final = frozenset({OWNER_GAVE_UP, OWNER_CANCELLED})

# Keys with fixed names.
#: zset of waiting jobs, score = enqueue time in ms: ``ZRANK`` is "N ahead of you".
WAITING: Final = PREFIX + "waiting"
#: set of the worker names ever seen; readers keep those whose heartbeat key lives.
WORKERS: Final = PREFIX + "workers"
#: hash ``{bytes, inodes}``: the cluster-wide storage quota.
QUOTA: Final = PREFIX + "quota"
#: one sweeper at a time (``SET NX PX``).
SWEEP_LOCK: Final = PREFIX + "sweep-lock"
#: the cluster's ``server_id`` in ``specifications/`` (``SET NX`` by the first front).
CLUSTER_ID: Final = PREFIX + "cluster-id"
#: the caps of the last front started (JSON, ``jobs.caps_message``): workers compare theirs.
FRONT_CAPS: Final = PREFIX + "front-caps"
#: hash name -> Unix time: when each worker (every heartbeat) or front last showed it was
#: alive. The sweeper deletes the keys of names gone for :data:`DEAD_NAME_SECONDS`.
SEEN: Final = PREFIX + "seen"
#: the Celery queue every worker consumes.
SHARED_QUEUE: Final = "sk.shared"
#: A name not seen for this long is dead: its queue, control stream and inbox are deleted
#: (a job routed to a dead worker's queue fell back to the shared one long before).
DEAD_NAME_SECONDS: Final = 600
#: A worker's control stream expires this long after its last heartbeat.
CONTROL_TTL_S: Final = DEAD_NAME_SECONDS
#: kombu's Redis transport keeps a queue's priorities in lists named ``<queue>`` and
#: ``<queue>\x06\x16<step>`` (steps 3, 6, 9 by default).
_PRIORITY_SEPARATOR: Final = "\x06\x16"
_PRIORITY_STEPS: Final = (3, 6, 9)


def job_id(text: object) -> str:
    """``text`` if it is a job id, else :class:`ValueError` (no key is built from junk)."""
    if not isinstance(text, str) or not JOB_ID_RE.fullmatch(text):
        raise ValueError(f"not a job id (32 lowercase hex digits): {_shown(text)}")
    return text


def name(text: object) -> str:
    """``text`` if it is a worker or front name, else :class:`ValueError`."""
    if not isinstance(text, str) or not NAME_RE.fullmatch(text):
        raise ValueError(
            f"not a worker or front name (letters, digits, '.', '_' and '-', at most 100, "
            f"starting with a letter or digit): {_shown(text)}"
        )
    return text


def claim_key(job: str) -> str:
    """``sk:claim:<job>``: who owns the job, a worker's name or a front's reserved owner."""
    return f"{PREFIX}claim:{job_id(job)}"


def worker_key(worker: str) -> str:
    """``sk:worker:<name>``: the worker's heartbeat, JSON, :data:`HEARTBEAT_TTL_MS`."""
    return f"{PREFIX}worker:{name(worker)}"


def worker_queue(worker: str) -> str:
    """The Celery queue only this worker consumes (routing to where an environment is)."""
    return f"sk.w.{name(worker)}"


def env_key(uuid: str) -> str:
    """``sk:env:<uuid>``: the workers that hold this environment locally."""
    if not is_uuid(uuid):
        raise ValueError(f"not an environment uuid: {_shown(uuid)}")
    return f"{PREFIX}env:{uuid.lower()}"


def inbox_key(front: str) -> str:
    """``sk:inbox:<front>``: the one reply stream of a front (all its jobs' events)."""
    return f"{PREFIX}inbox:{name(front)}"


def control_key(worker: str) -> str:
    """``sk:control:<worker>``: stdin, eof, stop and cancel for the jobs a worker runs."""
    return f"{PREFIX}control:{name(worker)}"


def keys_of_name(owner: str) -> list[str]:
    """Every key a worker or front named ``owner`` leaves behind when it dies: its Celery
    queue (with kombu's priority lists), its control stream and its inbox."""
    queue = worker_queue(owner)
    return [
        queue,
        *(f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS),
        control_key(owner),
        inbox_key(owner),
    ]


def upload_key(job: str) -> str:
    """``sk:upload:<job>``: an uploaded archive up to :data:`UPLOAD_INLINE_MAX` bytes."""
    return f"{PREFIX}upload:{job_id(job)}"


#: KEYS[1] = the claim key, KEYS[2] = the waiting zset; ARGV = owner, TTL in ms, job id.
#: Returns 1 if ``owner`` now owns the job (and took it out of the queue), 0 if someone
#: already did. ``SET ... NX`` answers nil (false in Lua) when the key exists.
CLAIM_SCRIPT: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return 0
"""


def _claim_call(job: str, owner: str) -> tuple[list[str], list[str | int]]:
    if owner not in FRONT_OWNERS:
        name(owner)
    return [claim_key(job), WAITING], [owner, CLAIM_TTL_MS, job]


def claim(client: redis.Redis, job: str, owner: str) -> bool:
    """Claim ``job`` for ``owner`` (a worker's name), atomically: True if it is now ours.

    A worker runs a job only after this answered True; on False the message is a copy, a
    redelivery, or a job its front gave up on, and is dropped.
    """
    keys, args = _claim_call(job, owner)
    return bool(client.register_script(CLAIM_SCRIPT)(keys, args))


async def claim_async(client: redis.asyncio.Redis, job: str, owner: str) -> bool:
    """:func:`claim` on a ``redis.asyncio`` client."""
    keys, args = _claim_call(job, owner)
    return bool(await client.register_script(CLAIM_SCRIPT)(keys, args))


def give_up(client: redis.Redis, job: str, owner: str = OWNER_GAVE_UP) -> bool:
    """The front's side of the claim: True means no worker can ever run ``job`` (503 is
    true); False means a worker claimed it first, and the front waits for its answer.
    ``owner`` is :data:`OWNER_GAVE_UP` (queue wait over) or :data:`OWNER_CANCELLED`."""
    return claim(client, job, _front_owner(owner))


async def give_up_async(client: redis.asyncio.Redis, job: str, owner: str = OWNER_GAVE_UP) -> bool:
    """:func:`give_up` on a ``redis.asyncio`` client."""
    return await claim_async(client, job, _front_owner(owner))


def _front_owner(owner: str) -> str:
    if owner not in FRONT_OWNERS:
        raise ValueError(f"a front gives a job up as one of {sorted(FRONT_OWNERS)}, not {owner!r}")
    return owner


def _shown(value: object) -> str:
    """A value for an error message: its repr, cut to 80 characters (it may be hostile)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The cluster-wide storage quota (``--max-storage``, ``--max-storage-inodes``): ``sk:quota`` is
# a hash of what the bucket holds (``bytes``, ``inodes``: set by the sweeper's recount) and of
# the reservations of the saves in progress (``reserved_bytes``, ``reserved_inodes``). A worker
# reserves a save's new bytes and inodes before publishing it, commits them (reserved -> held)
# once published, or releases them if the save failed. The recount sets only the held fields:
# a save in progress keeps its reservation whatever the sweeper does. Every decrement is
# clamped at zero: a recount or a Redis restart in between never leaves a negative count.

#: KEYS[1] = the quota hash; ARGV = bytes, inodes, max bytes, max inodes. Returns 1 (reserved),
#: 0 (it would not fit: nothing reserved), or -1 (no count yet: recount first, then retry).
QUOTA_RESERVE_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'bytes') == 0 then
  return -1
end
local function field(name)
  return tonumber(redis.call('HGET', KEYS[1], name) or '0') or 0
end
local used = field('bytes') + field('reserved_bytes')
local inodes = field('inodes') + field('reserved_inodes')
if used + tonumber(ARGV[1]) > tonumber(ARGV[3])
   or inodes + tonumber(ARGV[2]) > tonumber(ARGV[4]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'reserved_bytes', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'reserved_inodes', ARGV[2])
return 1
"""

#: KEYS[1] = the quota hash; ARGV = bytes, inodes, commit (1: the save is published, its
#: reservation becomes held; 0: it failed, the reservation is given back). Never below zero.
QUOTA_SETTLE_SCRIPT: Final = """
local function lower(name, amount)
  local now = tonumber(redis.call('HGET', KEYS[1], name) or '0') or 0
  local left = now - amount
  if left < 0 then left = 0 end
  redis.call('HSET', KEYS[1], name, left)
end
lower('reserved_bytes', tonumber(ARGV[1]))
lower('reserved_inodes', tonumber(ARGV[2]))
if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[1], 'bytes') == 1 then
  redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'inodes', ARGV[2])
end
return 1
"""

#: KEYS[1] = the quota hash; ARGV = bytes, inodes. Sets the count only if there is none (two
#: workers recounting at once agree: the first count stays).
QUOTA_INIT_SCRIPT: Final = """
if redis.call('HEXISTS', KEYS[1], 'bytes') == 0 then
  redis.call('HSET', KEYS[1], 'bytes', ARGV[1], 'inodes', ARGV[2])
  return 1
end
return 0
"""

QUOTA_RESERVED: Final = 1
QUOTA_FULL: Final = 0
QUOTA_UNCOUNTED: Final = -1


def reserve_quota(
    client: redis.Redis, size: int, inodes: int, max_bytes: int, max_inodes: int
) -> int:
    """Reserve ``size`` bytes and ``inodes`` in ``sk:quota``: :data:`QUOTA_RESERVED`,
    :data:`QUOTA_FULL` (nothing reserved) or :data:`QUOTA_UNCOUNTED` (recount, then retry)."""
    script = client.register_script(QUOTA_RESERVE_SCRIPT)
    return int(script([QUOTA], [size, inodes, max_bytes, max_inodes]))


def release_quota(client: redis.Redis, size: int, inodes: int) -> None:
    """Give back a reservation whose save failed (never below zero: a recount or a Redis
    restart may have run meanwhile)."""
    client.register_script(QUOTA_SETTLE_SCRIPT)([QUOTA], [size, inodes, 0])


def commit_quota(client: redis.Redis, size: int, inodes: int) -> None:
    """A reservation whose save is published: now held by the bucket until the recount."""
    client.register_script(QUOTA_SETTLE_SCRIPT)([QUOTA], [size, inodes, 1])


def quota_used(client: redis.Redis) -> tuple[int, int]:
    """Bytes and inodes the bucket holds or saves in progress reserved (for messages)."""
    raw = client.hmget(QUOTA, ["bytes", "inodes", "reserved_bytes", "reserved_inodes"])
    held, held_inodes, reserved, reserved_inodes = (_count(value) for value in raw)
    return held + reserved, held_inodes + reserved_inodes


def _count(value: object) -> int:
    """A count read from Redis: junk or a negative number counts as nothing."""
    if not isinstance(value, bytes | str | int):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def init_quota(client: redis.Redis, size: int, inodes: int) -> bool:
    """Set the count (from a recount) unless another process set one first."""
    return bool(client.register_script(QUOTA_INIT_SCRIPT)([QUOTA], [size, inodes]))
