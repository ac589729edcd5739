"""An app module whose own import fails (a dependency missing on this host)."""

import stem_test_dependency_not_installed  # noqa: F401
