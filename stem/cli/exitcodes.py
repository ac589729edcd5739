"""Named exit codes of the ``stem`` and ``stem-multi`` commands.

They are stable: systemd units list ``RestartPreventExitStatus=`` with the configuration and
usage codes so a broken configuration is not restarted in a loop.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # generic failure / health check failed
    USAGE = 2  # bad command line (typer/click's own code)
    CONFIG = 78  # EX_CONFIG: bad configuration or failing quality gate
    UNAVAILABLE = 69  # EX_UNAVAILABLE: broker/backend unreachable
    SOFTWARE = 70  # EX_SOFTWARE: internal error
    NOPERM = 77  # EX_NOPERM: permission problem (stem-multi: privilege drop, pidfile, log)
    NOT_FOUND = 66  # EX_NOINPUT: task id / dead letter / app not found
    TIMEOUT = 75  # EX_TEMPFAIL: waited and the result was not ready
    TASK_FAILED = 65  # EX_DATAERR: the awaited task ended in failure
