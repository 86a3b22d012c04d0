"""The model owner's side: CLI `owner` (and, later, its gRPC service)."""
