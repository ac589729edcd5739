"""The production example's task. Connection settings, TLS and keys all come from the
configuration (stem.production.yaml), none from code: the same module runs anywhere."""

from __future__ import annotations

from stem import Stem

app = Stem("invoices")


@app.task(name="invoices.total", max_retries=3, retry_backoff=True)
def total(lines: list[list[int]]) -> int:
    """Sum of quantity x unit price in cents."""
    return sum(quantity * cents for quantity, cents in lines)
