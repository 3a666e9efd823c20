"""Named crash points for testing crash safety: `TUTOR_FAILPOINT=name` kills the process there
with SIGKILL (no cleanup, no finally blocks), as a power cut or the OOM killer would."""
from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("TUTOR_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
