"""The library's tiny random models, under the short name the tests use."""

from offsite.models.tiny import (  # noqa: F401
    CORPUS,
    DEPTH,
    FAMILIES,
    VOCAB,
    save_tiny,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)
