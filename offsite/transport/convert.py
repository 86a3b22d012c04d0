"""Conversion between plain dicts and offsite.transport.v1 protobuf messages, in symmetric pairs."""

from __future__ import annotations

from offsite.transport.v1 import offsite_pb2 as pb


def file_info_to_proto(f: dict) -> pb.FileInfo:
    return pb.FileInfo(name=f["name"], size=f["size"], sha256=f["sha256"])


def file_info_from_proto(m: pb.FileInfo) -> dict:
    return {"name": m.name, "size": m.size, "sha256": m.sha256}


def bundle_to_proto(b: dict) -> pb.BundleInfo:
    return pb.BundleInfo(bundle_id=b["bundle_id"], name=b["name"], issued_at=b["issued_at"],
                         files=[file_info_to_proto(f) for f in b["files"]])  # fmt: skip


def bundle_from_proto(m: pb.BundleInfo) -> dict:
    return {"bundle_id": m.bundle_id, "name": m.name, "issued_at": m.issued_at,
            "files": [file_info_from_proto(f) for f in m.files]}  # fmt: skip


def upload_status_to_proto(s: dict) -> pb.UploadStatus:
    return pb.UploadStatus(upload_id=s["upload_id"], files=[pb.FileStatus(**f) for f in s["files"]])


def upload_status_from_proto(m: pb.UploadStatus) -> dict:
    return {"upload_id": m.upload_id,
            "files": [{"name": f.name, "committed": f.committed, "complete": f.complete} for f in m.files]}  # fmt: skip


def commit_to_proto(c: dict) -> pb.CommitUploadResponse:
    return pb.CommitUploadResponse(
        adapter_id=c["adapter_id"], status=c["status"], reason=c["reason"]
    )


def commit_from_proto(m: pb.CommitUploadResponse) -> dict:
    return {"adapter_id": m.adapter_id, "status": m.status, "reason": m.reason}
