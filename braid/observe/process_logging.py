"""Logging for braid's own processes (engine core, workers): spawned processes start with
no handlers, so without this their INFO lines (e.g. the DBO auto table) are lost."""
from __future__ import annotations

import logging
import os


def configure_process_logging(tag: str) -> None:
    """Log at BRAID_LOG_LEVEL (default WARNING) to stderr, each line tagged with the process."""
    logging.basicConfig(level=os.environ.get("BRAID_LOG_LEVEL", "WARNING"),
                        format=f"%(levelname)s {tag}: %(message)s")
