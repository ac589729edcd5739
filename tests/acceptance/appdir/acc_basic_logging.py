"""An app that sets up logging with logging.basicConfig(), as small apps do."""

from __future__ import annotations

import logging
import os

from stem import Stem

logging.basicConfig(level=logging.INFO, format="APP-HANDLER %(name)s: %(message)s")

URL = os.environ["STEM_TEST_BROKER"]
app = Stem("basic-logging", broker=URL, backend=URL)


@app.task(name="own.say")
def say(words: str) -> str:
    logging.getLogger("own.tasks").info("said %s", words)
    return words
