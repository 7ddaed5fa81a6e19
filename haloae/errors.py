"""The one error hierarchy of HaloAE Edge (core: stdlib only).

Every exception a *user* can trigger (a bad config, a missing file, a refused bundle, an
unreadable image) derives from `UserError`: the CLI runner (`haloae.cli.run`) prints it as one
line and exits with `EXIT_USER` (2). A `Failure` is something that went wrong although the
input was acceptable (an export whose parity check fails, an engine build that breaks): one
line, exit `EXIT_FAILED` (1). Anything else is a bug: the runner prints the traceback and exits
1, so a `ValueError` from a code path can never pass for bad input.

Stage-specific errors subclass these and keep their own names (``train.config.ConfigError``,
``haloae.manifest.BundleError``, ...). They also subclass the builtin they used to be
(``ValueError``, ``RuntimeError``) so callers that catch those keep working.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1    # a failure or a bug (a bug also prints its traceback)
EXIT_USER = 2      # bad input: config, files, arguments (systemd: RestartPreventExitStatus=2)
EXIT_INTERRUPTED = 130


class HaloaeError(Exception):
    """Base of every error HaloAE Edge raises on purpose."""

    exit_code = EXIT_FAILED


class UserError(HaloaeError):
    """Bad input a user can fix: the message says what is wrong and what to do."""

    exit_code = EXIT_USER


class Failure(HaloaeError):
    """The input was acceptable but the work failed (parity, engine build, I/O mid-run)."""

    exit_code = EXIT_FAILED
