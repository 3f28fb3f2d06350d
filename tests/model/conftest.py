"""Fixtures for the model tests: no hub access; tiny original checkpoints built once per session."""

from __future__ import annotations

import os

# Fail fast on a wrong path instead of retrying a download (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
