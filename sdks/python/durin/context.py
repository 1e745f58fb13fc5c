"""The context of one attempt: Durin's context API and egress, as Python calls.

Every call here is one HTTP request to Durin, named by the caller: the name is the
identity of the call within the invocation (plain-http.md §5, "Names identify calls"). A
wait whose result has not arrived raises the internal `Suspend`, which the endpoint turns
into `202 Durin-Suspended: true`; Durin calls the handler again, from the top, when the
result is there, and every call up to the wait then answers from the journal.
"""
import datetime
import http.client
import json as _json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


# --- Errors a handler sees -------------------------------------------------------------

class TerminalError(Exception):
    """Raise to end the invocation with this 4xx (not retried). `status` must be a 4xx
    other than 408 and 429 (those would be retried)."""

    def __init__(self, status: int, message: str, type: Optional[str] = None):
        if not _terminal(status):
            raise ValueError(f"a terminal status is a 4xx other than 408 and 429, not {status}")
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.answer_status = status  # what the endpoint answers Durin


def _terminal(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 429)


class Failure(TerminalError):
    """A rejected awakeable or a failed child call: `status`, `type`, `message`.
    Uncaught, it ends the invocation with `status` when that is a terminal 4xx, otherwise
    with 424 (Failed Dependency): retrying would meet the same journaled failure."""

    def __init__(self, status: int, message: str, type: Optional[str] = None):
        super().__init__(status if _terminal(status) else 424, message, type)
        self.status = status

    @classmethod
    def from_json(cls, f: dict) -> "Failure":
        return cls(int(f.get("status") or 500), f.get("message") or "", f.get("type"))


class Cancelled(Exception):
    """The invocation was cancelled before the wait's result arrived. Catch it to
    compensate (steps, state and egress calls still work), then re-raise it or raise a
    TerminalError: the invocation ends cancelled. Uncaught, the endpoint answers 409."""


class DurinError(Exception):
    """Durin refused a call in a way the handler cannot fix (a bad name, an egress refusal,
    a downstream unreachable...). Uncaught, the attempt answers 503 and is retried."""

    def __init__(self, status: int, message: str, problem: Any = None):
        super().__init__(f"Durin answered {status}: {message}")
        self.status, self.problem = status, problem


class Stop(BaseException):
    """Internal: this attempt must end now. A BaseException, so that a handler's
    `except Exception` does not swallow it. `suspended` says whether a wait suspended it."""

    def __init__(self, reason: str, suspended: bool = False, answer: Any = None):
        super().__init__(reason)
        self.suspended, self.answer = suspended, answer


class _TimedOut:
    def __repr__(self):
        return "durin.TIMED_OUT"

    def __bool__(self):
        return False


_UNSET = object()
TIMED_OUT = _TimedOut()
"""What `ctx.signal(..., timeout=...)` returns when the timeout fired first."""


# --- Results --------------------------------------------------------------------------

@dataclass
class Response:
    """A downstream's answer, through the egress (maybe replayed from the journal)."""
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def replayed(self) -> bool:
        return self.headers.get("durin-replayed") == "true"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return _json.loads(self.body) if self.body else None

    def raise_for_status(self) -> "Response":
        """A terminal 4xx raises TerminalError (retrying gets the same journaled answer);
        any other status from 300 up raises DurinError (the attempt is retried)."""
        if 400 <= self.status < 500 and self.status not in (408, 429):
            raise TerminalError(self.status, f"downstream answered {self.status}: {self.body[:200]!r}")
        if self.status >= 300:
            raise DurinError(self.status, f"downstream answered {self.body[:200]!r}")
        return self


@dataclass
class Awakeable:
    token: str
    resolve_url: str
    reject_url: str
    completed: bool


class Update:
    """An update a caller sent to this workflow's run (`POST /v1/workflows/{workflow}/
    {workflow_id}/updates/{name}`), received at an update wait. Every later attempt gets
    the same update at the same wait. The caller waits for one of:

    * `refuse(status, message)`: the validator says no; the caller gets that 4xx and
      nothing is journaled (refusing again, on a later attempt, changes nothing);
    * `answer(value)`: the caller gets `200` with `value`;
    * `fail(status, message)`: the caller gets that failure (`update-failed`).

    The first answer or failure is journaled; any later one, in any attempt, changes
    nothing and returns the recorded one.
    """

    def __init__(self, ctx: "Context", update_id: str, name: str, input: Any):
        self._ctx = ctx
        self.update_id, self.name, self.input = update_id, name, input

    def __repr__(self):
        return f"Update({self.update_id!r}, {self.name!r}, input={self.input!r})"

    def _path(self, what: str) -> str:
        return f"updates/{self._ctx._q(self.update_id)}/{what}"

    def refuse(self, status: int = 422, message: str = "refused") -> None:
        """Refuse the update with this 4xx: the caller gets it; the run goes on."""
        if not 400 <= status < 500:
            raise ValueError(f"an update is refused with a 4xx, not {status}")
        self._ctx._call("POST", self._path("refuse"), {"status": status, "message": message},
                        has_body=True)

    def answer(self, value: Any = None) -> dict:
        """Answer the update with `value`. Returns the recorded answer, `{"value": V}`
        (or `{"failure": {...}}` when an earlier attempt failed it)."""
        return self._ctx._call("POST", self._path("result"), {"value": value}, has_body=True)[2]

    def fail(self, status: int, message: str, type: Optional[str] = None) -> dict:
        """Answer the update with a failure (`status` in 400..599). Returns the recorded
        answer."""
        if not 400 <= status < 600:
            raise ValueError(f"an update fails with a 4xx or 5xx, not {status}")
        failure = {"status": status, "message": message, **({"type": type} if type else {})}
        return self._ctx._call("POST", self._path("result"), {"failure": failure}, has_body=True)[2]


@dataclass
class Winner:
    """Which member of `ctx.first` won, and its result. When an update member won,
    `update` is the Update (its `value` is the raw `{"update_id", "name", "input"}`)."""
    index: int
    kind: str
    name: str
    value: Any = None
    failure: Optional[Failure] = None
    invocation_id: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False)
    update: Optional[Update] = None

    def result(self) -> Any:
        """The value, or raise the Failure (a rejected awakeable, a failed child)."""
        if self.failure is not None:
            raise self.failure
        return self.value


def _duration(d) -> dict:
    """A sleep's body: "30s" (humantime), seconds as a number, or a timedelta."""
    if isinstance(d, str):
        return {"duration": d}
    if isinstance(d, datetime.timedelta):
        d = d.total_seconds()
    if isinstance(d, (int, float)) and d >= 0:
        return {"duration_ms": int(d * 1000)}
    raise ValueError(f"a duration is a humantime string, seconds or a timedelta, not {d!r}")


def _timer(duration, wake_at_ms: Optional[int]) -> dict:
    if (duration is None) == (wake_at_ms is None):
        raise ValueError("a timer takes one of duration and wake_at_ms")
    return {"wake_at_ms": int(wake_at_ms)} if wake_at_ms is not None else _duration(duration)


def _humantime(d) -> str:
    body = _duration(d)
    return body["duration"] if "duration" in body else f"{body['duration_ms']}ms"


# --- The context ----------------------------------------------------------------------

class Context:
    """One attempt of one invocation. Not thread-safe: use it from the handler's thread."""

    def __init__(self, headers: dict, durin: str, egress: Optional[str]):
        def need(name):
            if not headers.get(name):
                raise TerminalError(400, f"missing header {name}: not a request from Durin")
            return headers[name]
        self.invocation_id: str = need("durin-invocation-id")
        if not need("durin-attempt").isdigit():
            raise TerminalError(400, "Durin-Attempt is not a number")
        self.attempt: int = int(headers["durin-attempt"])
        self._token: str = need("durin-attempt-token")
        self.workflow_id: Optional[str] = headers.get("durin-workflow-id") or None
        self.cancelled: bool = headers.get("durin-cancelled") == "true"
        self.headers = headers
        self._durin = urllib.parse.urlsplit(durin)
        self._egress = urllib.parse.urlsplit(egress) if egress else None
        self._connections: dict = {}

    # -- plumbing

    def _send(self, target, method, url, body, headers) -> http.client.HTTPResponse:
        """One request on this attempt's keep-alive connection to `target`."""
        conn = self._connections.get(target.netloc)
        if conn is None:
            kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
            conn = kind(target.hostname, target.port, timeout=90)
            self._connections[target.netloc] = conn
        try:
            conn.request(method, url, body=body, headers=headers)
            response = conn.getresponse()
            response.data = response.read()
        except BaseException:
            conn.close()
            del self._connections[target.netloc]
            raise
        return response

    def close(self):
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def _call(self, method: str, path: str, body: Any = None, has_body: bool = False, query=None):
        """A context API call: (status, headers, JSON value or None). Raises Stop on a
        suspension or a stale attempt, Cancelled on a cancelled wait, DurinError else."""
        url = f"{self._durin.path.rstrip('/')}/v1/contexts/{urllib.parse.quote(self.invocation_id)}/{path}"
        query = {k: v for k, v in (query or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"durin-attempt": str(self.attempt), "durin-attempt-token": self._token}
        data = None
        if has_body:
            data = _json.dumps(body).encode()
            headers["content-type"] = "application/json"
        r = self._send(self._durin, method, url, data, headers)
        if r.getheader("durin-suspended") == "true":
            raise Stop(f"{method} {path} suspended the attempt", suspended=True)
        value = _json.loads(r.data) if r.data else None
        if r.status == 409:
            if isinstance(value, dict) and value.get("type") == "urn:durin:problem:cancelled":
                raise Cancelled(f"{path}: the invocation was cancelled")
            raise Stop(f"{method} {path}: the attempt is stale (409)")
        if r.status >= 300:
            detail = value.get("detail") or value.get("title") if isinstance(value, dict) else value
            raise DurinError(r.status, f"{method} {path}: {detail}", value)
        return r.status, r.headers, value

    @staticmethod
    def _q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    # -- steps and egress

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """The value recorded as step `name`; only when there is none, run `fn()` and
        record its (JSON) value. Runs at most once per attempt that reaches it, and never
        again once recorded."""
        status, _, value = self._call("GET", f"steps/{self._q(name)}")
        if status == 204:
            _, _, value = self._call("POST", f"steps/{self._q(name)}", fn(), has_body=True)
        return value

    def http(self, method: str, url: str, *, json: Any = _UNSET, body: Optional[bytes] = None,
             headers: Optional[dict] = None) -> Response:
        """Send `method url` through Durin's egress (journaled; a completed call is answered
        from the journal and never sent again). Give `json=` or `body=`. Returns the
        downstream's answer whatever its status; see Response.raise_for_status."""
        if self._egress is None:
            raise RuntimeError("no egress configured: Endpoint(egress=...)")
        h = {"content-type": "application/json"} if json is not _UNSET else {}
        h.update(headers or {})
        h.update({"durin-invocation-id": self.invocation_id, "durin-attempt": str(self.attempt),
                  "durin-attempt-token": self._token})
        if "traceparent" in self.headers and not any(k.lower() == "traceparent" for k in h):
            h["traceparent"] = self.headers["traceparent"]
        data = _json.dumps(json).encode() if json is not _UNSET else body
        r = self._send(self._egress, method, url, data, h)
        if r.getheader("durin-error-source") == "gateway":
            if r.status == 409:
                raise Stop(f"egress {method} {url}: conflict (stale attempt or non-determinism)")
            raise DurinError(r.status, f"egress {method} {url}: {r.data[:300]!r}")
        return Response(r.status, r.headers, r.data)

    # -- waits

    def sleep(self, name: str, duration=None, *, wake_at_ms: Optional[int] = None) -> dict:
        """Sleep durably: the timer `name` fires once, `duration` after the first call (or
        at `wake_at_ms`, ms since the epoch). Returns {"wake_at_ms", "fired_at_ms"}."""
        return self._call("POST", f"sleep/{self._q(name)}", _timer(duration, wake_at_ms),
                          has_body=True)[2]

    def signal(self, name: str, key: Optional[str] = None, timeout=None) -> Any:
        """The payload of the signal `name` (the wait is named by `key`, default `name`).
        With `timeout`, returns TIMED_OUT when the timeout fired first."""
        query = {"key": key, "timeout": None if timeout is None else _humantime(timeout)}
        status, _, value = self._call("POST", f"signals/{self._q(name)}", query=query)
        return TIMED_OUT if status == 204 else value

    def awakeable(self, name: str) -> Awakeable:
        """Create (or find again) the awakeable `name`: its token and URLs. Never waits."""
        v = self._call("POST", f"awakeables/{self._q(name)}")[2]
        return Awakeable(v["token"], v.get("resolve_url"), v.get("reject_url"), v.get("completed", False))

    def wait_awakeable(self, name: str) -> Any:
        """The value the awakeable `name` was resolved with; raises Failure if rejected."""
        v = self._call("POST", f"awakeables/{self._q(name)}/wait")[2]
        if "failure" in v:
            raise Failure.from_json(v["failure"])
        return v.get("value")

    # members of `first`: the same identity as the single wait of that kind and name
    @staticmethod
    def signal_member(name: str, key: Optional[str] = None) -> dict:
        return {"signal": name, **({"key": key} if key else {})}

    @staticmethod
    def awakeable_member(name: str) -> dict:
        return {"awakeable": name}

    @staticmethod
    def sleep_member(name: str, duration=None, *, wake_at_ms: Optional[int] = None) -> dict:
        return {"sleep": name, **_timer(duration, wake_at_ms)}

    @staticmethod
    def update_member(name: str, key: Optional[str] = None) -> dict:
        """The next update `name` sent to this workflow's run; `key` (default `name`) names
        the wait: take the next update with another key."""
        return {"update": name, **({"key": key} if key else {})}

    @staticmethod
    def call_member(name: str, service: str, handler: str, input: Any = None,
                    workflow_id: Optional[str] = None) -> dict:
        m = {"call": name, "service": service, "handler": handler, "input": input}
        return {**m, "workflow_id": workflow_id} if workflow_id else m

    def first(self, *members: dict) -> Winner:
        """Wait for the first of several members (signal/update/awakeable/sleep/call) to
        arrive. The same winner on every later attempt."""
        v = self._call("POST", "first", {"of": list(members)}, has_body=True)[2]
        failure = Failure.from_json(v["failure"]) if v.get("failure") else None
        update = None
        if v["kind"] == "update":
            u = v.get("value") or {}
            update = Update(self, u["update_id"], u.get("name", v["name"]), u.get("input"))
        return Winner(v["index"], v["kind"], v["name"], v.get("value"), failure,
                      v.get("invocation_id"), v, update)

    def update(self, name: str, key: Optional[str] = None) -> Update:
        """Wait for the next update `name` sent to this workflow's run (the wait is named
        by `key`, default `name`: the next one needs another key). Refuse it, or answer it
        (`update.answer(value)`), before the next wait for that name."""
        return self.first(self.update_member(name, key)).update

    # -- state

    def set_state(self, key: str, value: Any) -> None:
        """Set the state `key` that queries read (replays like the other calls)."""
        self._call("PUT", f"state/{self._q(key)}", value, has_body=True)

    def clear_state(self, key: str) -> None:
        self._call("DELETE", f"state/{self._q(key)}")

    # -- children

    def call(self, name: str, service: str, handler: str, input: Any = None,
             workflow_id: Optional[str] = None) -> Any:
        """Start `service/handler` once as a child and wait for its output (raises
        Failure if it failed)."""
        body = self.call_member(name, service, handler, input, workflow_id)
        del body["call"]
        v = self._call("POST", f"calls/{self._q(name)}", body, has_body=True)[2]
        if v.get("failure"):
            raise Failure.from_json(v["failure"])
        return v.get("value")

    def send(self, name: str, service: str, handler: str, input: Any = None, delay=None,
             workflow_id: Optional[str] = None) -> str:
        """Start `service/handler` once as a child without waiting (`delay` later:
        seconds, a timedelta or a humantime string). Returns its invocation id."""
        body = {"service": service, "handler": handler, "input": input}
        if delay is not None:
            body["delay_ms"] = _duration(delay).get("duration_ms")
            if body["delay_ms"] is None:
                raise ValueError("give `delay` as seconds or a timedelta")
        if workflow_id:
            body["workflow_id"] = workflow_id
        v = self._call("POST", f"sends/{self._q(name)}", body, has_body=True)[2]
        if v.get("refused"):
            raise Failure.from_json(v["refused"])
        return v["invocation_id"]

    # -- heartbeats and continue-as-new

    def heartbeat(self, details: Any = None) -> None:
        """Tell Durin this attempt is alive and how far it got."""
        self._call("POST", "heartbeat", details, has_body=True)

    def last_heartbeat(self) -> Any:
        """The details of the last heartbeat of any attempt (None: none)."""
        return (self._call("GET", "heartbeat")[2] or {}).get("details")

    def continue_as_new(self, input: Any = None):
        """End this workflow run and start the next with `input`. Does not return."""
        v = self._call("POST", "continue-as-new", input, has_body=True)[2]
        raise Stop("continued as new", answer=v)

    def check_cancelled(self) -> None:
        """Raise Cancelled if this invocation was cancelled (Durin-Cancelled: true)."""
        if self.cancelled:
            raise Cancelled("the invocation was cancelled")
