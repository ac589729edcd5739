"""Apply command-line connection overrides to an app (config layers join in later)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.cli.context import CLIState


def apply_settings(app: Stem, st: CLIState, *, gates: bool = False) -> Any:
    if st.broker or st.backend:
        app.configure(broker=st.broker, backend=st.backend)
    return None
