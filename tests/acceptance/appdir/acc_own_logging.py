"""An app that sets up root logging itself, as Django or Flask settings do."""

from __future__ import annotations

import logging
import logging.config
import os

from stem import Stem

logging.config.dictConfig(
    {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"app": {"format": "APP-HANDLER %(name)s: %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "app"}},
        "root": {"handlers": ["console"], "level": "INFO"},
    }
)

URL = os.environ["STEM_TEST_BROKER"]
app = Stem("own-logging", broker=URL, backend=URL)


@app.task(name="own.say")
def say(words: str) -> str:
    logging.getLogger("own.tasks").info("said %s", words)
    return words
