"""Run the ``stem`` CLI with :func:`stem.worker.service.attach` wired to the worker, the way
``stem worker`` does it once the CLI is wired (``--state-file``, env STEM_WORKER_STATE_FILE;
sd_notify when NOTIFY_SOCKET is set; the heartbeat sized from WATCHDOG_USEC).

Usage: ``python service_shim.py [stem options] worker [worker options]``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from stem.observability import signals
from stem.worker import service

# Taken out of the environment: until worker.state_file is a setting, the config loader
# rejects STEM_WORKER_* variables it does not know.
STATE_FILE = os.environ.pop(service.STATE_FILE_ENV, None)


def _on_init(worker: Any, **_: Any) -> None:
    interval = service.watchdog_interval_s(os.environ)
    if interval is not None and worker.config.heartbeat_s > interval:
        worker.config = dataclasses.replace(worker.config, heartbeat_s=interval)
    service.attach(worker, state_file=STATE_FILE, notify=True)


if __name__ == "__main__":
    signals.worker_init.connect(_on_init)
    from stem.cli.main import main

    sys.argv[0] = "stem"
    main(sys.argv[1:])
