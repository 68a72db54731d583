"""Where a Hub keeps its catalog and store when no home is given."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_home() -> Path:
    """``$ADAPTERHUB_HOME``, else the platform's user data folder."""
    env = os.environ.get("ADAPTERHUB_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "adapterhub"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "adapterhub"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "adapterhub"
