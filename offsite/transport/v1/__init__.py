"""Generated gRPC stubs for package offsite.transport.v1 (made by `python -m scripts.gen_protos`; do not edit)."""
