"""Durable session state in Redis: the committed context, turns, the owner's lease, the summary.

Why Redis: a verifier can die at any moment; whatever it committed must survive it, so a
replacement verifier (or a reconnecting client) finds exactly the committed tokens, none lost,
none repeated (design invariant 2), and only the current owner can add to them (invariant 4).

Keys of one session (the id sits in a hash tag, `{id}`, so a Redis Cluster keeps all of them on
one slot and every Lua script below may touch them together):

    {prefix}:session:{id}:meta     hash: epoch, owner, state, params (JSON), created_at, nonce, turn_id,
                                   key (SHA-256 of the API key that created it; '' without keys)
    {prefix}:session:{id}:ctx      string: the whole committed context, uint32 little endian
    {prefix}:session:{id}:turns    list: user_start, gen_start per turn (flattened pairs)
    {prefix}:session:{id}:summary  string: the latest verifier -> drafter summary (opaque bytes)
    {prefix}:session:{id}:lease    string: the owner, with the lease's TTL (PX)

`ctx` is one log for everything the model has seen: prompt, generated tokens, later user turns.
Turn i's user tokens are ctx[user_start_i : gen_start_i] and its generated tokens
ctx[gen_start_i : user_start_{i+1}] (or to the end for the latest turn); turn 0's user tokens
are the prompt. So `context()` is exactly what a replacement verifier prefills. The log is a packed
string rather than a list: 4 bytes per token, one APPEND per round and one GET to reload a
100k-token context.

Every write is ONE Lua script, so it is atomic: a Redis that becomes unreachable mid-call leaves
either the whole write or nothing. Writes that matter carry the owner's epoch and are refused
for a stale one; a Lua script runs without interleaving, so an owner that raced a lease steal
cannot slip an append in after the steal. Writes are also safe to retry (see `append`).
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import redis

from kvstore.coord.connection import RedisBacked, RedisUnavailable, check_id
from sparsespec.errors import InvalidArgument, SparseSpecError

__all__ = ["SessionStore", "SessionRecord", "Turn", "RedisUnavailable", "SessionNotFound", "SessionExists",
           "StaleEpoch", "LeaseHeld", "LogConflict", "SessionClosed", "SessionBusy"]

STATES = ("active", "finished", "aborted")
MAX_TOKEN = 2**32 - 1


# --- errors ------------------------------------------------------------------------------

class SessionNotFound(SparseSpecError):
    """No such session (never created, or cleaned up after finishing)."""


class SessionExists(SparseSpecError):
    """`create` was given an id that is already taken."""


class StaleEpoch(SparseSpecError):
    """The caller's epoch is no longer the session's: another owner took the lease since."""

    def __init__(self, message: str, current: int):
        self.current = current
        super().__init__(message)


class LeaseHeld(SparseSpecError):
    """Another owner holds a live lease on the session."""

    def __init__(self, message: str, owner: str, ms_left: int):
        self.owner, self.ms_left = owner, ms_left
        super().__init__(message)


class LogConflict(SparseSpecError):
    """The committed context does not have the length the writer expected (`actual_len` has it)."""

    def __init__(self, message: str, actual_len: int):
        self.actual_len = actual_len
        super().__init__(message)


class SessionClosed(SparseSpecError):
    """The session is finished or aborted: it takes no more tokens until `begin_turn`."""


class SessionBusy(SparseSpecError):
    """A turn of the session is running (or was interrupted and awaits a resume): one turn of a
    session runs at a time, so a new one is refused until it finishes."""


def check_count(field: str, value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise InvalidArgument(field, f"must be an int >= 0, got {value!r}")
    return value


def pack_tokens(field: str, tokens: list[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error:
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t <= MAX_TOKEN), None)
        raise InvalidArgument(field, f"token id {bad!r} is not an int in [0, 2**32)") from None


def unpack_tokens(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


# --- Lua -----------------------------------------------------------------------------------
# Replies are {code, ...}; see _raise. KEYS always start with meta.

OK, NOT_FOUND, STALE, LEASE_HELD, CONFLICT, CLOSED, EXISTS, NO_TURN, BUSY = range(9)

_CHECK_EPOCH = """
local function check_epoch(meta, epoch)
  if redis.call('EXISTS', meta) == 0 then return {1} end
  local cur = tonumber(redis.call('HGET', meta, 'epoch'))
  if cur ~= tonumber(epoch) then return {2, cur} end
  return nil
end
"""

# KEYS meta ctx turns summary lease; ARGV prompt params created_at nonce owner ttl_ms [key] (absent from a
# caller of the version before keys, during a rolling upgrade: no key)
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'nonce') == ARGV[4] and redis.call('HGET', KEYS[1], 'owner') == ARGV[5] then
    -- a retry of this very create, by the same owner
    return {0, tonumber(redis.call('HGET', KEYS[1], 'epoch'))}
  end
  return {6}
end
if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4], KEYS[5]) > 0 then  -- leftovers of an expired namesake
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
end
local n = string.len(ARGV[1]) / 4
redis.call('SET', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], 0, n)
local epoch = 0
if ARGV[5] ~= '' then
  epoch = 1
  redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[6])
end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'owner', ARGV[5], 'state', 'active',
           'params', ARGV[2], 'created_at', ARGV[3], 'nonce', ARGV[4], 'turn_id', ARGV[4], 'key', ARGV[7] or '')
return {0, epoch}
"""

# KEYS meta ctx turns lease
_GET = """
local m = redis.call('HGETALL', KEYS[1])
if #m == 0 then return {1} end
local t = redis.call('LRANGE', KEYS[3], 0, -1)
local g0 = tonumber(t[2])
local prompt = ''
if g0 > 0 then prompt = redis.call('GETRANGE', KEYS[2], 0, 4 * g0 - 1) end
return {0, m, t, redis.call('STRLEN', KEYS[2]) / 4, prompt, redis.call('PTTL', KEYS[4])}
"""

# KEYS meta lease; ARGV owner ttl_ms force
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {1} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] and ARGV[3] ~= '1' then
  return {3, holder, redis.call('PTTL', KEYS[2])}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {0, epoch}
"""

# KEYS meta lease; ARGV owner epoch ttl_ms ('' = release)
_RENEW = _CHECK_EPOCH + """
local err = check_epoch(KEYS[1], ARGV[2])
if err then return err end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return {2, tonumber(redis.call('HGET', KEYS[1], 'epoch'))}
end
if ARGV[3] == '' then
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
end
return {0}
"""

# KEYS meta ctx; ARGV epoch expected_len tokens
_APPEND = _CHECK_EPOCH + """
local err = check_epoch(KEYS[1], ARGV[1])
if err then return err end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'active' then return {5, state} end
local len = redis.call('STRLEN', KEYS[2]) / 4
local exp = tonumber(ARGV[2])
local n = string.len(ARGV[3]) / 4
if len == exp then
  if n > 0 then redis.call('APPEND', KEYS[2], ARGV[3]) end
  return {0, len + n}
end
if n > 0 and len == exp + n and redis.call('GETRANGE', KEYS[2], 4 * exp, 4 * len - 1) == ARGV[3] then
  return {0, len}  -- a retry of an append that already landed
end
return {4, len}
"""

# KEYS meta ctx turns summary; ARGV epoch expected_len tokens params has_params turn_id.
# One turn at a time: refused (BUSY) while the latest turn is active, so the check and the
# registration of the turn are one atomic step, across verifiers too.
_BEGIN_TURN = _CHECK_EPOCH + """
local err = check_epoch(KEYS[1], ARGV[1])
if err then return err end
if redis.call('HGET', KEYS[1], 'turn_id') == ARGV[6] then  -- a retry of this very turn start
  local last = redis.call('LRANGE', KEYS[3], -1, -1)
  return {0, tonumber(last[1]), redis.call('LLEN', KEYS[3]) / 2 - 1}
end
if redis.call('HGET', KEYS[1], 'state') == 'active' then return {8} end
local len = redis.call('STRLEN', KEYS[2]) / 4
local exp = tonumber(ARGV[2])
local n = string.len(ARGV[3]) / 4
if len ~= exp then return {4, len} end
if n > 0 then redis.call('APPEND', KEYS[2], ARGV[3]) end
redis.call('RPUSH', KEYS[3], exp, exp + n)
redis.call('HSET', KEYS[1], 'state', 'active', 'turn_id', ARGV[6])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'params', ARGV[4]) end
for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end  -- a finished session lives again
return {0, exp + n, redis.call('LLEN', KEYS[3]) / 2 - 1}
"""

# KEYS meta ctx turns summary lease; ARGV epoch state ttl_ms. The owner's lease is released: the
# session's next turn may start on any verifier at once (the epoch still fences this owner).
_FINISH = _CHECK_EPOCH + """
local err = check_epoch(KEYS[1], ARGV[1])
if err then return err end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
if redis.call('GET', KEYS[5]) == redis.call('HGET', KEYS[1], 'owner') then redis.call('DEL', KEYS[5]) end
return {0}
"""

# KEYS meta summary; ARGV epoch data. A finished session's summary expires with it.
_PUT_SUMMARY = _CHECK_EPOCH + """
local err = check_epoch(KEYS[1], ARGV[1])
if err then return err end
local ttl = redis.call('PTTL', KEYS[1])  -- time stands still in a script: same expiry instant
if ttl > 0 then redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl) else redis.call('SET', KEYS[2], ARGV[2]) end
return {0}
"""

# KEYS meta ctx turns; ARGV turn offset end ('' = to the end of the turn)
_READ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {1} end
local nt = redis.call('LLEN', KEYS[3]) / 2
local t = tonumber(ARGV[1])
if t < 0 then t = nt + t end
if t < 0 or t >= nt then return {7, nt} end
local g = tonumber(redis.call('LINDEX', KEYS[3], 2 * t + 1))
local stop
if t + 1 < nt then stop = tonumber(redis.call('LINDEX', KEYS[3], 2 * t + 2))
else stop = redis.call('STRLEN', KEYS[2]) / 4 end
local s = g + tonumber(ARGV[2])
local e = stop
if ARGV[3] ~= '' then e = math.min(stop, g + tonumber(ARGV[3])) end
if s >= e then return {0, '', t} end
return {0, redis.call('GETRANGE', KEYS[2], 4 * s, 4 * e - 1), t}
"""


# --- the store -----------------------------------------------------------------------------

class Turn(NamedTuple):
    """Where one turn sits in the context: its user tokens start at user_start, its generated
    tokens at gen_start (and run to the next turn's user_start, or the end)."""
    user_start: int
    gen_start: int


@dataclass
class SessionRecord:
    session_id: str
    prompt_ids: list[int]
    params: dict
    epoch: int            # 0 until someone takes the lease; +1 per acquisition
    owner: str            # who acquired `epoch` ('' if nobody yet); may hold an expired lease
    state: str            # "active" | "finished" | "aborted"
    ctx_len: int          # committed context length (what `append` expects next)
    turns: list[Turn]
    created_at: float
    lease_ms_left: int    # 0 when no live lease
    turn_id: str = ""     # the latest turn's id (its client's, when it sent one)
    key: str = ""         # hash of the API key the session is bound to (sparsespec.auth); set once, at create

    @property
    def generated_len(self) -> int:
        """Tokens generated so far in the latest turn."""
        return self.ctx_len - self.turns[-1].gen_start


class SessionStore(RedisBacked):
    """Sessions in Redis. Every method raises RedisUnavailable when Redis cannot be reached."""

    def __init__(self, target: str | redis.Redis, prefix: str = "sparsespec", finished_ttl_s: float = 3600):
        super().__init__(target, prefix)
        if finished_ttl_s <= 0:
            raise InvalidArgument("finished_ttl_s", f"must be > 0, got {finished_ttl_s}")
        self.finished_ttl_ms = int(finished_ttl_s * 1000)
        r = self.redis
        self._create, self._get, self._acquire = (r.register_script(s) for s in (_CREATE, _GET, _ACQUIRE))
        self._renew, self._append, self._begin_turn = (r.register_script(s)
                                                       for s in (_RENEW, _APPEND, _BEGIN_TURN))
        self._finish, self._put_summary, self._read = (r.register_script(s)
                                                       for s in (_FINISH, _PUT_SUMMARY, _READ))

    def _key(self, session_id: str, part: str) -> str:
        # The id is a hash tag: one session's keys share a Cluster slot, so scripts may touch them all.
        return f"{self.prefix}:session:{{{check_id('session_id', session_id)}}}:{part}"

    def _keys(self, session_id: str, *parts: str) -> list[str]:
        return [self._key(session_id, p) for p in parts]

    def _run(self, script, session_id: str, parts: tuple[str, ...], args: list) -> list:
        with self.reachable():
            reply = script(keys=self._keys(session_id, *parts), args=args)
        if reply[0] != OK:
            self._raise(session_id, reply)
        return reply

    @staticmethod
    def _raise(session_id: str, reply: list):
        code, rest = reply[0], reply[1:]
        s = f"session {session_id!r}"
        if code == NOT_FOUND:
            raise SessionNotFound(f"session_id: {s} not found")
        if code == STALE:
            raise StaleEpoch(f"epoch: {s} is now at epoch {rest[0]}; this owner lost it", current=int(rest[0]))
        if code == LEASE_HELD:
            owner, ms = rest[0].decode(), max(0, int(rest[1]))
            raise LeaseHeld(f"lease: {s} is leased by {owner!r} for another {ms} ms", owner=owner, ms_left=ms)
        if code == CONFLICT:
            raise LogConflict(f"expected_len: {s} has {rest[0]} committed tokens", actual_len=int(rest[0]))
        if code == CLOSED:
            raise SessionClosed(f"session_id: {s} is {rest[0].decode()}; begin a turn first")
        if code == EXISTS:
            raise SessionExists(f"session_id: {s} already exists")
        if code == NO_TURN:
            raise InvalidArgument("turn", f"{s} has {rest[0]} turns")
        if code == BUSY:
            raise SessionBusy(f"session_id: {s} has a turn in progress; resume it (resume=true) "
                              "or wait until it finishes")
        raise AssertionError(f"unknown reply {reply!r}")

    # --- records -------------------------------------------------------------------------

    def create(self, session_id: str, prompt_ids: list[int], params: dict | None = None,
               owner: str = "", lease_ttl_ms: int = 0, turn_id: str | None = None,
               key: str = "") -> SessionRecord:
        """A new session whose context is the prompt (turn 0, id `turn_id`). With `owner`, it is
        created already leased to it (epoch 1), in the same atomic step. Refuses an existing id,
        except a repeat of this very create (same turn_id: a retry after a lost reply)."""
        prompt = pack_tokens("prompt_ids", prompt_ids)
        params_json = _dump_params(params or {})
        if owner:
            check_id("owner", owner)
            _check_ttl(lease_ttl_ms)
        created_at = time.time()
        turn_id = turn_id or uuid.uuid4().hex
        reply = self._run(self._create, session_id, ("meta", "ctx", "turns", "summary", "lease"),
                          [prompt, params_json, repr(created_at), turn_id, owner, lease_ttl_ms, key])
        n = len(prompt_ids)
        return SessionRecord(session_id=session_id, prompt_ids=list(prompt_ids), params=json.loads(params_json),
                             epoch=int(reply[1]), owner=owner, state="active", ctx_len=n, turns=[Turn(0, n)],
                             created_at=created_at, lease_ms_left=lease_ttl_ms if owner else 0,
                             turn_id=turn_id, key=key)

    def get(self, session_id: str) -> SessionRecord:
        _, meta, turns, ctx_len, prompt, pttl = self._run(self._get, session_id,
                                                          ("meta", "ctx", "turns", "lease"), [])
        m = {meta[i].decode(): meta[i + 1] for i in range(0, len(meta), 2)}
        t = [int(x) for x in turns]
        return SessionRecord(session_id=session_id, prompt_ids=unpack_tokens(prompt),
                             params=json.loads(m["params"]), epoch=int(m["epoch"]), owner=m["owner"].decode(),
                             state=m["state"].decode(), ctx_len=int(ctx_len),
                             turns=[Turn(t[i], t[i + 1]) for i in range(0, len(t), 2)],
                             created_at=float(m["created_at"]), lease_ms_left=max(0, int(pttl)),
                             turn_id=m.get("turn_id", b"").decode(), key=m.get("key", b"").decode())

    # --- lease ---------------------------------------------------------------------------

    def acquire_lease(self, session_id: str, owner: str, ttl_ms: int, steal_expired_only: bool = True) -> int:
        """Take the session: returns the new epoch (old epoch + 1), which fences off every
        earlier owner's writes. Raises LeaseHeld while another owner's lease is live, unless
        steal_expired_only=False (the caller knows the holder is dead)."""
        check_id("owner", owner)
        _check_ttl(ttl_ms)
        reply = self._run(self._acquire, session_id, ("meta", "lease"),
                          [owner, ttl_ms, "0" if steal_expired_only else "1"])
        return int(reply[1])

    def renew_lease(self, session_id: str, owner: str, epoch: int, ttl_ms: int) -> None:
        """Extend the lease to ttl_ms from now. Works after expiry too, as long as nobody took
        the session since (the epoch is still current); else StaleEpoch."""
        _check_ttl(ttl_ms)
        self._run(self._renew, session_id, ("meta", "lease"), [owner, epoch, ttl_ms])

    def release_lease(self, session_id: str, owner: str, epoch: int) -> None:
        """Let another owner acquire at once. The epoch stays current until someone does."""
        self._run(self._renew, session_id, ("meta", "lease"), [owner, epoch, ""])

    # --- the committed context -----------------------------------------------------------

    def append(self, session_id: str, epoch: int, expected_len: int, tokens: list[int]) -> int:
        """Commit tokens at the end of the context; returns the new context length.

        The only way tokens get committed. Refused with StaleEpoch if `epoch` is not current,
        SessionClosed if the session is not active, LogConflict if the context does not have
        `expected_len` tokens. Repeating an append that already landed (a retry after a lost
        reply) returns the same length and writes nothing."""
        check_count("epoch", epoch)
        check_count("expected_len", expected_len)
        data = pack_tokens("tokens", tokens)
        return int(self._run(self._append, session_id, ("meta", "ctx"), [epoch, expected_len, data])[1])

    def begin_turn(self, session_id: str, epoch: int, expected_len: int, user_tokens: list[int],
                   params: dict | None = None, turn_id: str | None = None) -> int:
        """Start a new turn: commit the user's tokens after everything so far and return where
        the turn's generated tokens will start. Refused with SessionBusy while the latest turn
        is active (one turn at a time). Reopens a finished session (clears its TTL); `params`,
        if given, replace the session's. Same fencing as `append`; a repeat with the same
        `turn_id` (a retry after a lost reply) returns the same start and writes nothing."""
        check_count("epoch", epoch)
        check_count("expected_len", expected_len)
        data = pack_tokens("user_tokens", user_tokens)
        args = [epoch, expected_len, data, _dump_params(params) if params is not None else "",
                "1" if params is not None else "0", turn_id or uuid.uuid4().hex]
        return int(self._run(self._begin_turn, session_id, ("meta", "ctx", "turns", "summary"), args)[1])

    def read(self, session_id: str, offset: int = 0, end: int | None = None, turn: int = -1) -> list[int]:
        """Generated tokens [offset, end) of one turn (default: the latest), offsets counted
        from the turn's first generated token: what a reconnecting client resumes from."""
        if offset < 0 or (end is not None and end < 0):
            raise InvalidArgument("offset", f"must be >= 0, got offset={offset} end={end}")
        reply = self._run(self._read, session_id, ("meta", "ctx", "turns"),
                          [turn, offset, "" if end is None else end])
        return unpack_tokens(reply[1])

    def context(self, session_id: str) -> list[int]:
        """The whole committed context (prompt, generated, later user turns): what a replacement
        verifier prefills."""
        return unpack_tokens(self._part(session_id, "ctx") or b"")

    def finish(self, session_id: str, epoch: int, state: str = "finished") -> None:
        """Mark the session finished (or aborted), release the owner's lease, and let Redis
        delete it after finished_ttl_s; until then it can be read, resumed, or reopened by
        `begin_turn` (on any verifier)."""
        if state not in STATES[1:]:
            raise InvalidArgument("state", f"must be one of {STATES[1:]}, got {state!r}")
        self._run(self._finish, session_id, ("meta", "ctx", "turns", "summary", "lease"),
                  [epoch, state, self.finished_ttl_ms])

    # --- summary slot --------------------------------------------------------------------

    def put_summary(self, session_id: str, epoch: int, data: bytes) -> None:
        """Replace the latest summary, so a replacement drafter starts from it."""
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidArgument("summary", f"must be bytes, got {type(data).__name__}")
        self._run(self._put_summary, session_id, ("meta", "summary"), [epoch, bytes(data)])

    def get_summary(self, session_id: str) -> bytes | None:
        return self._part(session_id, "summary")

    def _part(self, session_id: str, part: str) -> bytes | None:
        """One key of an existing session (SessionNotFound otherwise), read in one transaction
        with the check, so an expiry in between cannot pass for an empty value."""
        with self.reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.exists(self._key(session_id, "meta"))
            pipe.get(self._key(session_id, part))
            exists, data = pipe.execute()
        if not exists:
            self._raise(session_id, [NOT_FOUND])
        return data


def _check_ttl(ttl_ms: int) -> None:
    if not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise InvalidArgument("ttl_ms", f"must be a positive int, got {ttl_ms!r}")


def _dump_params(params: dict) -> str:
    try:
        return json.dumps(params, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidArgument("params", f"must be JSON-serialisable: {e}") from None
