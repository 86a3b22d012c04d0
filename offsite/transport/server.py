"""The model owner's gRPC server: mutual TLS, identity from the client certificate."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from offsite.errors import OffsiteError
from offsite.exchange.home import OwnerHome
from offsite.exchange.pki import common_name
from offsite.exchange.protocol import (
    CHUNK_BYTES,
    PROTOCOL_VERSION,
    AccessDenied,
    BadRequest,
    Busy,
    NotFound,
    Unauthenticated,
)
from offsite.exchange.service import OwnerService
from offsite.transport import CHANNEL_OPTIONS, INSECURE_IDENTITY_HEADER
from offsite.transport.convert import bundle_to_proto, commit_to_proto, upload_status_to_proto
from offsite.transport.v1 import offsite_pb2 as pb
from offsite.transport.v1 import offsite_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES = [(Unauthenticated, grpc.StatusCode.UNAUTHENTICATED), (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
          (NotFound, grpc.StatusCode.NOT_FOUND), (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
          (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (OffsiteError, grpc.StatusCode.FAILED_PRECONDITION)]  # fmt: skip


def _code(error: OffsiteError) -> grpc.StatusCode:
    return next(code for kind, code in _CODES if isinstance(error, kind))


@contextlib.contextmanager
def _refusals(name: str, context) -> Iterator[None]:
    """Turn library errors raised inside the block into the matching gRPC status."""
    try:
        yield
    except OffsiteError as e:
        log.warning("%s refused: %s", name, e)
        context.abort(_code(e), str(e))
    except grpc.RpcError:
        raise
    except Exception:  # a bug or the owner's machine (disk, memory): no details leave the server
        if context.is_active():
            log.exception("%s failed", name)
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"{name} failed on the owner's side; the owner's log has the details",
            )
        raise


def _rpc(method):
    """Authenticate the caller (within its share of the server), log the call, and turn library
    errors into gRPC status codes."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with _refusals(method.__name__, context):
            identity = self.caller(context, method.__name__)
            with self.slots.hold(identity):
                return method(self, identity, request, context)

    return wrapper


def _stream_rpc(method):
    """Like _rpc, for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with _refusals(method.__name__, context):
            identity = self.caller(context, method.__name__)
            with self.slots.hold(identity):
                yield from method(self, identity, request, context)

    return wrapper


class _Slots:
    """Calls in flight per identity, capped so that one data owner never holds every worker."""

    def __init__(self, per_identity: int) -> None:
        self.per_identity, self._busy, self._lock = per_identity, Counter(), threading.Lock()

    @contextlib.contextmanager
    def hold(self, identity: str) -> Iterator[None]:
        with self._lock:
            if self._busy[identity] >= self.per_identity:
                raise Busy(
                    f"{identity} already has {self.per_identity} calls in flight; retry later"
                )
            self._busy[identity] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[identity] -= 1


def _idle_watchdog(messages: Iterator, context, idle_s: float) -> Iterator:
    """Pass the stream's messages on; cancel the call when none arrives for `idle_s` seconds."""
    timer: threading.Timer | None = None

    def arm() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
        timer = threading.Timer(idle_s, context.cancel)
        timer.daemon = True
        timer.start()

    arm()
    try:
        for message in messages:
            arm()
            yield message
    finally:
        timer.cancel()


class OffsiteServicer(pb_grpc.OffsiteServicer):
    """Each method: who is calling, one OwnerService call, convert the result."""

    def __init__(self, service: OwnerService, insecure: bool = False) -> None:
        self.service = service
        self.insecure = insecure
        self.slots = _Slots(service.limits.max_calls_per_identity)

    def caller(self, context, method: str) -> str:
        """The authenticated identity of the caller, logged with the method it calls."""
        identity = self.identity(context)
        log.info("%s %s", identity, method)
        return identity

    def identity(self, context) -> str:
        if self.insecure:
            claimed = dict(context.invocation_metadata()).get(INSECURE_IDENTITY_HEADER, "")
            return self.service.authenticate(claimed, None)
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if not pem:
            raise Unauthenticated("no client certificate")
        return self.service.authenticate(common_name(pem), pem)

    @_rpc
    def Health(self, identity, request, context):
        return pb.HealthResponse(format_version=PROTOCOL_VERSION, status="ok", identity=identity)

    @_rpc
    def ListBundles(self, identity, request, context):
        self.service.check_version(request.format_version)
        bundles = self.service.list_bundles(identity)
        return pb.ListBundlesResponse(
            format_version=PROTOCOL_VERSION, bundles=[bundle_to_proto(b) for b in bundles]
        )

    @_stream_rpc
    def Download(self, identity, request, context):
        self.service.check_version(request.format_version)
        for offset, data in self.service.read_file(
            identity, request.bundle_id, request.file, request.offset
        ):
            yield pb.Chunk(offset=offset, data=data)

    @_rpc
    def BeginUpload(self, identity, request, context):
        self.service.check_version(request.format_version)
        files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in request.files]
        return upload_status_to_proto(self.service.begin_upload(identity, request.bundle_id, files))

    @_rpc
    def Write(self, identity, request_iterator, context):
        request_iterator = _idle_watchdog(
            request_iterator, context, self.service.limits.idle_stream_s
        )
        first = next(request_iterator, None)
        if first is None:
            raise BadRequest("empty write stream")
        self.service.check_version(first.format_version)

        def chunks():
            for m in itertools.chain([first], request_iterator):
                if m.upload_id != first.upload_id:
                    raise BadRequest("one write stream carries one upload")
                yield m.file, m.offset, m.data

        return upload_status_to_proto(self.service.write(identity, first.upload_id, chunks()))

    @_rpc
    def QueryUpload(self, identity, request, context):
        self.service.check_version(request.format_version)
        return upload_status_to_proto(self.service.upload_status(identity, request.upload_id))

    @_rpc
    def CommitUpload(self, identity, request, context):
        self.service.check_version(request.format_version)
        return commit_to_proto(self.service.commit(identity, request.upload_id))


def check_listen(listen: str) -> None:
    """Refuse an address that is not host:port with a port from 0 to 65535 (grpc would bind
    port 99999 modulo 65536, or fail later without saying why)."""
    host, sep, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host
        or not port.isdigit()
        or int(port) > 65535
        or (":" in host and not bracketed)
    ):
        raise OffsiteError(
            f"`listen` {listen!r}: give host:port, e.g. 127.0.0.1:50051 or [::1]:50051 (port 0-65535)"
        )


def start_server(
    service: OwnerService, listen: str, *, insecure: bool = False
) -> tuple[grpc.Server, int]:
    """Start serving on `listen` (host:port; port 0 picks one); returns the server and its port.

    As many worker threads as `service.limits.max_calls`; calls beyond that are refused with
    RESOURCE_EXHAUSTED (clients retry with backoff) instead of queueing behind idle streams.
    """
    check_listen(listen)
    workers = service.limits.max_calls
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS,
                         maximum_concurrent_rpcs=workers)  # fmt: skip
    pb_grpc.add_OffsiteServicer_to_server(OffsiteServicer(service, insecure), server)
    if insecure:
        log.warning(
            "INSECURE MODE: no TLS, callers are whoever they claim to be; for local testing only"
        )
        port = server.add_insecure_port(listen)
    else:
        tls = service.home.server
        creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], root_certificates=service.home.ca.cert_pem,
                                            require_client_auth=True)  # fmt: skip
        port = server.add_secure_port(listen, creds)
    if port == 0:
        raise OffsiteError(f"cannot listen on {listen}: address in use or invalid")
    server.start()
    return server, port


def serve(
    home: OwnerHome,
    listen: str,
    stop: threading.Event,
    *,
    insecure: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """`owner serve`: serve `home`'s bundles on `listen` until `stop` is set, then shut down cleanly."""
    service = OwnerService(home, chunk_bytes=chunk_bytes)
    try:
        server, port = start_server(service, listen, insecure=insecure)
        if on_ready:
            on_ready(f"{listen.rsplit(':', 1)[0]}:{port}")
        stop.wait()
        server.stop(grace=5).wait()
    finally:
        service.close()
