"""The app of the logging tests (acc_own_logging, acc_basic_logging), built once their
module has set up logging its own way."""

from __future__ import annotations

import logging
import os

from stem import Stem


def make_app(name: str) -> Stem:
    url = os.environ["STEM_TEST_BROKER"]
    app = Stem(name, broker=url, backend=url)

    @app.task(name="own.say")
    def say(words: str) -> str:
        logging.getLogger("own.tasks").info("said %s", words)
        return words

    return app
