"""gRPC transport: the only package that imports grpc. Server in server.py, client in client.py."""

# Message size limits, set explicitly on both ends: a 1 MiB chunk plus framing fits easily, and no
# message can carry a whole artefact.
MAX_MESSAGE_BYTES = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
INSECURE_IDENTITY_HEADER = "x-offsite-insecure-identity"
