from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("format_version", "status", "identity")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    status: str
    identity: str
    def __init__(self, format_version: _Optional[int] = ..., status: _Optional[str] = ..., identity: _Optional[str] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("bundle_id", "name", "files", "issued_at")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    name: str
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    issued_at: str
    def __init__(self, bundle_id: _Optional[str] = ..., name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., issued_at: _Optional[str] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ("format_version",)
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    def __init__(self, format_version: _Optional[int] = ...) -> None: ...

class ListBundlesResponse(_message.Message):
    __slots__ = ("format_version", "bundles")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    def __init__(self, format_version: _Optional[int] = ..., bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("format_version", "bundle_id", "file", "offset")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    bundle_id: str
    file: str
    offset: int
    def __init__(self, format_version: _Optional[int] = ..., bundle_id: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("format_version", "bundle_id", "files")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    bundle_id: str
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    def __init__(self, format_version: _Optional[int] = ..., bundle_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("format_version", "upload_id", "file", "offset", "data")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    upload_id: str
    file: str
    offset: int
    data: bytes
    def __init__(self, format_version: _Optional[int] = ..., upload_id: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FileStatus(_message.Message):
    __slots__ = ("name", "committed", "complete")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    name: str
    committed: int
    complete: bool
    def __init__(self, name: _Optional[str] = ..., committed: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("upload_id", "files")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    files: _containers.RepeatedCompositeFieldContainer[FileStatus]
    def __init__(self, upload_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileStatus, _Mapping]]] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("format_version", "upload_id")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    upload_id: str
    def __init__(self, format_version: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class CommitUploadRequest(_message.Message):
    __slots__ = ("format_version", "upload_id")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    upload_id: str
    def __init__(self, format_version: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class CommitUploadResponse(_message.Message):
    __slots__ = ("adapter_id", "status", "reason")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    status: str
    reason: str
    def __init__(self, adapter_id: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
