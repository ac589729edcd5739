"""An app that sets up logging with logging.basicConfig(), as small apps do."""

from __future__ import annotations

import logging

from acc_logging_tasks import make_app

logging.basicConfig(level=logging.INFO, format="APP-HANDLER %(name)s: %(message)s")

app = make_app("basic-logging")
