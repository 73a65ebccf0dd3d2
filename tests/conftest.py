"""Shared pytest set-up: quiet progress bars, two torch threads, one-session artifacts."""

from __future__ import annotations

import os

os.environ.setdefault("NEXLAB_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
