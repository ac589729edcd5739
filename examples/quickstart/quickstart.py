"""Stem in one file: an in-memory broker, a worker in this process, and a producer.

python examples/quickstart/quickstart.py
"""

from __future__ import annotations

from stem import Stem
from stem.worker.embedded import running_worker

app = Stem("quickstart", broker="memory://quickstart", backend="memory://quickstart")


@app.task(name="greet")
def greet(name: str) -> str:
    return f"hello, {name}"


@app.task(name="add", max_retries=2, retry_backoff=0.1, autoretry_for=(ZeroDivisionError,))
def add(x: int, y: int) -> int:
    return x + y


def main() -> None:
    with running_worker(app, pool="thread", concurrency=4):
        print(greet.delay("world").get(timeout=10))
        results = [add.delay(i, i) for i in range(5)]
        print("sums:", [r.get(timeout=10) for r in results])
        later = greet.enqueue(args=["later"], countdown=0.5)
        print(later.get(timeout=10), "(after a 0.5 s countdown)")


if __name__ == "__main__":
    main()
