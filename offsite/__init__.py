"""Offsite-tuning: fine-tune a model's adapter through a lossy emulator, then plug it back."""

__version__ = "0.1.0"
