"""The signed example's task: a money transfer, so a forged or altered message is easy to see.

The worker imports this module (``stem --app signed_tasks:app worker``); its keys come from
the ``STEM_SIGNING_*`` variables that run.py gives each worker process.
"""

from __future__ import annotations

import os

from stem import Stem

DB = os.environ.get("SIGNED_EXAMPLE_DB", "var/stem.db")
app = Stem("signed", broker=f"sqlite:///{DB}")


@app.task(name="bank.transfer")
def transfer(account: str, cents: int) -> str:
    return f"moved {cents} cents to {account}"
