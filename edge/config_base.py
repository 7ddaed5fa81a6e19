"""What every daemon config section shares: the strict base and error line from core
(`haloae.config_base`: the same for model, training and daemon configs) and the daemon's
secret lookups (environment or systemd credentials, never the YAML)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from haloae.config_base import Strict, format_error

__all__ = ["Strict", "format_error", "secret", "check_env_name", "check_credential_name"]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def secret(env: str, credential: str) -> str | None:
    """A secret from the environment variable ``env``, else ``$CREDENTIALS_DIRECTORY/credential``
    (systemd ``LoadCredential=``); never from the YAML. None when neither is set."""
    if os.environ.get(env):
        return os.environ[env]
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return (Path(cred_dir) / credential).read_text().strip() or None
    return None


def check_env_name(v: str) -> str:
    if ENV_NAME.fullmatch(v) is None:
        raise ValueError(f"{v!r} is not an environment variable name (letters, digits, '_')")
    return v


def check_credential_name(v: str, problem: str | None = None) -> str:
    if not v or "/" in v or v in (".", "..") or problem:
        raise ValueError(f"{v!r} is not a file name in $CREDENTIALS_DIRECTORY")
    return v
