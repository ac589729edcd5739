"""An app that sets up root logging itself, as Django or Flask settings do."""

from __future__ import annotations

import logging
import logging.config

from acc_logging_tasks import make_app

logging.config.dictConfig(
    {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"app": {"format": "APP-HANDLER %(name)s: %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "app"}},
        "root": {"handlers": ["console"], "level": "INFO"},
    }
)

app = make_app("own-logging")
