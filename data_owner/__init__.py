"""The data owner's side: CLI `data-owner` (and, later, its gRPC client)."""
