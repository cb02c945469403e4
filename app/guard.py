"""The app's front door: an ASGI middleware in front of Gradio that keeps one client from exhausting the server.

Every HTTP request passes `Guard`, which
- answers only Host headers naming the loopback interface when the app is bound to it (a DNS-rebinding page on
  another site cannot reach it through the victim's browser);
- refuses uploads and the other routes an app without file inputs never needs (Gradio would accept any file of any
  size at /gradio_api/upload);
- checks a request to run a model before it enters the queue: body size, JSON, an endpoint of this app (the
  page-only events run in the browser and have no server side), the number of values, and the client's share of
  the queue (`client_slots` requests queued or running per client address); the values themselves are checked by
  the endpoints' Gradio validator (app/limits.py), also before the queue;
- notes which results are being read (the event streams), so that a running job whose client has gone stops
  (`Guard.gone`), and serves the results from memory (app/images.py).
Refusals are one line of JSON: {"detail": "..."} (422 in Gradio's validation format, so that the page shows them
at the input and gradio_client raises them as a ValidationError).

Gradio's own internals used here (a Gradio upgrade that changes them fails tests/test_app.py): the routes' paths,
and the queue's events (`Blocks._queue`) to count a client's requests.
"""

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlparse

API = "/gradio_api"
FILE = f"{API}/file="
# Routes an app without file inputs, streaming inputs or custom components never needs.
CLOSED = ("/upload", "/upload_progress", "/component_server", "/process_recording", "/stream/", "/vibe-",
          "/run-history", "/runs")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
DEFAULT_CLIENT_SLOTS = 2  # requests one client address may have queued or running
MAX_BODY = 64 * 1024  # bytes: the largest request of this app is a few hundred bytes
KEEP_SEEN = 4096  # sessions whose reading we remember


def result_token(path: str, prefix: str) -> str | None:
    """The token of a result's address: /results/<token>, or Gradio's file route wrapping that URL
    (/gradio_api/file=http://host/results/<token>, which gradio_client asks for); None for anything else."""
    if path.startswith(FILE):
        path = urlparse(unquote(path[len(FILE):])).path
    return path[len(prefix):] if path.startswith(prefix) else None


def host_name(headers: dict) -> str | None:
    """The host name of a Host header value, lower case, IPv6 literals in brackets, without the port."""
    host = headers.get(b"host")
    if host is None:
        return None
    host = host.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Endpoint:
    index: int  # Gradio's fn_index
    inputs: tuple  # the names of its inputs, in order


@dataclass
class Policy:
    allowed_hosts: set | None = None  # None: any Host header (the app is not bound to loopback)
    client_slots: int = DEFAULT_CLIENT_SLOTS
    reader_grace: float = 10.0  # seconds a job's results may go unread before it counts as abandoned
    max_body: int = MAX_BODY


@dataclass
class Readers:
    """Which sessions have an open result stream, and since when the others have had none."""
    open: Counter = field(default_factory=Counter)
    last_seen: dict = field(default_factory=dict)  # session -> time of its join or of its last stream's end
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, key: str) -> None:
        with self.lock:
            self.last_seen.pop(key, None)
            self.last_seen[key] = time.monotonic()
            while len(self.last_seen) > KEEP_SEEN:
                self.last_seen.pop(next(iter(self.last_seen)))

    def opened(self, key: str) -> None:
        with self.lock:
            self.open[key] += 1

    def closed(self, key: str) -> None:
        with self.lock:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]
        self.seen(key)

    def gone(self, key: str | None, grace: float) -> bool:
        """True if nobody reads `key`'s results and nobody has for `grace` seconds; unknown sessions never are."""
        with self.lock:
            if key is None or self.open.get(key, 0) > 0 or key not in self.last_seen:
                return False
            return time.monotonic() - self.last_seen[key] > grace


class Guard:
    """The ASGI middleware (see the module's docstring). `state` is the app's `ServerState`."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        policy = self.state.policy
        headers = dict(scope.get("headers") or [])
        if policy.allowed_hosts is not None and host_name(headers) not in policy.allowed_hosts:
            return await refuse(scope, send, 403, "this app answers only on the loopback interface (Host: "
                                                  f"{', '.join(sorted(policy.allowed_hosts))})")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path.startswith(API) and path[len(API):].startswith(CLOSED):
            return await refuse(scope, send, 403, "this app takes no uploads and serves no such route")
        if method in ("GET", "HEAD") and (path.startswith(self.state.results_prefix) or path.startswith(FILE)):
            token = result_token(path, self.state.results_prefix)
            if token is not None:
                return await self.result(token, scope, send)
        if method == "POST" and (path == f"{API}/queue/join" or path.startswith((f"{API}/call/", f"{API}/run/",
                                                                                 f"{API}/api/"))):
            return await self.run_request(path, scope, receive, send)
        if method == "GET" and (path == f"{API}/queue/data" or path.startswith(f"{API}/call/")):
            return await self.stream(path, scope, receive, send)
        return await self.app(scope, receive, send)

    # ------------------------------------------------------------------ requests to run a model

    async def run_request(self, path, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.state.policy.max_body:
                return await refuse(scope, send, 413, f"the request body is over {self.state.policy.max_body:,} "
                                                      f"bytes; this app's requests take a few hundred")
        try:
            request = json.loads(body)
        except ValueError:
            return await refuse(scope, send, 400, "the request body is not valid JSON")
        if not isinstance(request, dict):
            return await refuse(scope, send, 400, "the request body must be a JSON object")
        endpoint = self.endpoint_of(path, request)
        if endpoint is None:
            names = ", ".join(f"/{name}" for name in self.state.api_names)
            return await refuse(scope, send, 404, f"no such endpoint; this app serves {names}")
        data = request.get("data")
        if not isinstance(data, list) or len(data) != len(endpoint.inputs):
            got = len(data) if isinstance(data, list) else "no list"
            return await refuse_input(scope, send, endpoint, endpoint.inputs[0],
                                      f"expected {len(endpoint.inputs)} values ({', '.join(endpoint.inputs)}), "
                                      f"got {got}")
        host = (scope.get("client") or ("?",))[0]
        queued = path == f"{API}/queue/join" or path.startswith(f"{API}/call/")
        state = self.state
        if queued:  # checked and counted without an await in between: concurrent joins cannot both take a slot
            held = state.requests_of(host) + state.joining[host]
            if held >= state.policy.client_slots:
                return await refuse(scope, send, 503, f"this client already has {held} requests queued or running "
                                                      f"(at most {state.policy.client_slots} per client); wait for "
                                                      f"one to finish")
            state.joining[host] += 1
        if isinstance(request.get("session_hash"), str):
            state.readers.seen(request["session_hash"])
        sent = [body]

        async def replay():
            if sent:
                return {"type": "http.request", "body": sent.pop(), "more_body": False}
            return await receive()

        answer = []

        async def capture(message):  # the event id of a /call request: its results are read under that id
            if message["type"] == "http.response.body" and path.startswith(f"{API}/call/"):
                answer.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay, capture)
        finally:
            if queued:
                state.joining[host] -= 1
                if state.joining[host] <= 0:
                    del state.joining[host]
        if answer:
            try:
                state.readers.seen(json.loads(b"".join(answer))["event_id"])
            except (ValueError, KeyError, TypeError):
                pass

    def endpoint_of(self, path: str, request: dict):
        if path == f"{API}/queue/join":
            index = request.get("fn_index")
            return self.state.endpoints.get(index) if isinstance(index, int) else None
        name = path.rstrip("/").rsplit("/", 1)[-1]
        index = self.state.api_names.get(name)
        return None if index is None else self.state.endpoints.get(index)

    # ------------------------------------------------------------------ result streams and results

    async def stream(self, path, scope, receive, send):
        if path == f"{API}/queue/data":
            key = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [None])[0]
        else:
            key = path.rstrip("/").rsplit("/", 1)[-1]
        if not key:
            return await self.app(scope, receive, send)
        self.state.readers.opened(key)
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.readers.closed(key)

    async def result(self, token, scope, send):
        data = self.state.store.get(token)
        if data is None:
            return await refuse(scope, send, 404, "no such result (results are kept for a while, then dropped)")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(data)).encode()),
                                (b"cache-control", b"private, max-age=3600")]})
        await send({"type": "http.response.body", "body": data if scope["method"] == "GET" else b""})


async def refuse(scope, send, status: int, message: str, detail=None) -> None:
    body = json.dumps({"detail": message if detail is None else detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def refuse_input(scope, send, endpoint: Endpoint, field: str, message: str) -> None:
    """422 in the format of Gradio's validators: one entry per input, the message at `field`."""
    await refuse(scope, send, 422, message, validation(endpoint.inputs, field, message))


def validation(inputs, field: str, message: str) -> list:
    return [{"__type__": "validate", "is_valid": name != field, "message": message if name == field else "",
             "parameter_name": name} for name in inputs]


def requests_by_host(queue) -> Counter:
    """Requests queued or running per client address, from Gradio's queue (its internals: see the docstring)."""
    events = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
    events += [e for job in queue.active_jobs if job for e in job]
    hosts = Counter()
    for event in events:
        client = getattr(getattr(event, "request", None), "client", None)
        hosts[client.host if client else "?"] += 1
    return hosts
