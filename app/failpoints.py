"""Named fault points for testing crash and I/O-error safety.

`TUTOR_FAILPOINT=name` kills the process there with SIGKILL (no cleanup, no finally blocks), as a
power cut or the OOM killer would. `TUTOR_FAILPOINT=name=enospc` raises the OSError a full disk
gives instead, and `name=eio` an I/O error, so the code's own error handling runs.
"""
from __future__ import annotations

import errno
import os
import signal

ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}


def failpoint(name: str) -> None:
    point, _, kind = os.environ.get("TUTOR_FAILPOINT", "").partition("=")
    if point != name:
        return
    if kind in ERRORS:
        raise OSError(ERRORS[kind], os.strerror(ERRORS[kind]))
    os.kill(os.getpid(), signal.SIGKILL)
