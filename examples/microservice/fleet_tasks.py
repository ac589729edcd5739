"""The worker fleet's code: the tasks ``stem worker --app fleet_tasks:app`` runs.

The producer service (producer.py) never imports this module: it knows the task names and
the broker URL, nothing else.
"""

from __future__ import annotations

import os
import time

from stem import Stem

app = Stem("fleet", broker=os.environ.get("STEM_BROKER_URL", "redis://127.0.0.1:6379/0"))

PRICES_CENTS = {"apple": 50, "pear": 75, "melon": 300}


@app.task(name="orders.price", queue="pricing")
def price(order_id: int, items: dict[str, int]) -> int:
    time.sleep(0.1)  # stands in for a database lookup, so both workers get a share
    return sum(PRICES_CENTS[sku] * count for sku, count in items.items())  # KeyError: unknown


@app.task(name="orders.ship", queue="shipping")
def ship(order_id: int, address: str) -> str:
    return f"order {order_id} shipped to {address}"
