"""The model owner's gRPC server: mutual TLS, identity from the client certificate."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Iterator
from concurrent import futures

import grpc

from offsite.errors import OffsiteError
from offsite.exchange.pki import common_name
from offsite.exchange.service import (
    PROTOCOL_VERSION,
    AccessDenied,
    BadRequest,
    NotFound,
    OwnerService,
    Unauthenticated,
)
from offsite.transport import CHANNEL_OPTIONS, INSECURE_IDENTITY_HEADER
from offsite.transport.convert import bundle_to_proto, commit_to_proto, upload_status_to_proto
from offsite.transport.v1 import offsite_pb2 as pb
from offsite.transport.v1 import offsite_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES = [(Unauthenticated, grpc.StatusCode.UNAUTHENTICATED), (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
          (NotFound, grpc.StatusCode.NOT_FOUND), (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
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


def _rpc(method):
    """Authenticate the caller, log the call, and turn library errors into gRPC status codes."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with _refusals(method.__name__, context):
            return method(self, self.caller(context, method.__name__), request, context)

    return wrapper


def _stream_rpc(method):
    """Like _rpc, for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with _refusals(method.__name__, context):
            yield from method(self, self.caller(context, method.__name__), request, context)

    return wrapper


class OffsiteServicer(pb_grpc.OffsiteServicer):
    """Each method: who is calling, one OwnerService call, convert the result."""

    def __init__(self, service: OwnerService, insecure: bool = False) -> None:
        self.service = service
        self.insecure = insecure

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


def start_server(
    service: OwnerService, listen: str, *, insecure: bool = False, workers: int = 32
) -> tuple[grpc.Server, int]:
    """Start serving on `listen` (host:port; port 0 picks one); returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
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
