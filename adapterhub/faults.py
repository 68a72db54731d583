"""Fault injection for the crash tests: ``ADAPTERHUB_FAULT=<point>`` kills the process (SIGKILL, as
``kill -9`` would) when it reaches that named point. Unset, a point costs one dictionary lookup.

Points: ``add.stored`` (files in the store, rows not yet written), ``remove.trashed`` (objects moved to
the trash inside the removal's transaction), ``merge.writing`` (a merge's first tensor written),
``combine.written`` (a derived adapter written to scratch), ``export.writing`` (an export in scratch),
``pull.downloaded`` (a pull's files downloaded), ``push.uploading`` (a push about to commit).
"""

from __future__ import annotations

import os
import signal

ENV = "ADAPTERHUB_FAULT"


def point(name: str) -> None:
    """Die here if ``$ADAPTERHUB_FAULT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
