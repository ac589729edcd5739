"""The producer service: enqueue orders by task name, fetch the results from Redis.

    STEM_BROKER_URL=redis://127.0.0.1:6379/0 python examples/microservice/producer.py

run.py starts it after the worker fleet. It imports no task code: the task names, the
routes and the broker URL are all it shares with the workers. Exits 1 if a result is
missing or wrong.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

from stem import Stem, control
from stem.errors import StemError, TaskError

URL = os.environ.get("STEM_BROKER_URL", "redis://127.0.0.1:6379/0")
FLEET_SIZE = 2
WAIT_S = 20.0
ROUTES = {"orders.price": "pricing", "orders.ship": "shipping"}


class Failed(Exception):
    """A result was missing or not what the fleet should have returned."""


def wait_for_fleet(app: Stem) -> list[str]:
    """The node names of the live workers, once FLEET_SIZE of them answer a ping."""
    deadline = time.monotonic() + WAIT_S
    while True:
        names = sorted(r.worker for r in control.broadcast(app, "ping", timeout_s=1.0) if r.ok)
        if len(names) >= FLEET_SIZE:
            return names
        if time.monotonic() > deadline:
            raise Failed(f"only {names or 'no workers'} answered ping within {WAIT_S:g}s")
        time.sleep(0.2)


def run(app: Stem) -> None:
    fleet = wait_for_fleet(app)
    print(f"fleet: {', '.join(fleet)} answered ping")
    orders = {n: {"apple": n % 4, "pear": 1 + n % 3} for n in range(1, 21)}
    priced = [app.send_task("orders.price", [n, items]) for n, items in orders.items()]
    shipped = [app.send_task("orders.ship", [n, f"{n} Main Street"]) for n in (1, 2, 3)]
    bad = app.send_task("orders.price", [99, {"durian": 1}])
    print(f"producer (pid {os.getpid()}) enqueued 20 orders.price, 3 orders.ship, 1 bad order")

    totals = [res.get(timeout=WAIT_S) for res in priced]
    runners = Counter(str(res.record.worker if res.record else None) for res in priced)
    shares = ", ".join(f"{name} ran {n}" for name, n in sorted(runners.items()))
    print(f"orders.price: 20 results, {sum(totals)} cents in all ({shares})")
    if len(runners) < FLEET_SIZE:
        raise Failed(f"pricing ran on {sorted(runners)} only; both workers consume 'pricing'")

    for res in shipped:
        where = res.record.worker if res.record else None
        print(f"orders.ship: {res.get(timeout=WAIT_S)!r} (ran on {where})")
    shippers = {res.record.worker if res.record else None for res in shipped}
    if len(shippers) != 1:
        raise Failed(f"shipping ran on {shippers}; only one worker consumes 'shipping'")

    try:
        bad.get(timeout=WAIT_S)
    except TaskError as exc:
        print(
            f"bad order: the task failed on its worker, the producer got {exc.type_name}: "
            f"{exc.error_message}"
        )
    else:
        raise Failed("the order with an unknown item did not fail")


def main() -> int:
    app = Stem("orders-api", broker=URL, routes=ROUTES)
    try:
        run(app)
    except (Failed, StemError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
