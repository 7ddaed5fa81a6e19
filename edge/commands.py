"""Command topics: ``<prefix>/model/set``, ``<prefix>/<camera>/feedback/set`` and
``<prefix>/<camera>/calibrate/set``.

Unlike a setting (``threshold/set``: a number applied at once), a command starts work that can
fail later (verifying and loading a bundle, filing evidence); its outcome goes to a retained
``.../state`` topic. Here only the payloads are checked, strictly (they come from the network):
a refusal is a :class:`CommandError` whose text goes to ``<prefix>/error`` (``docs/mqtt.md``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from haloae.errors import UserError

MAX_COMMAND_BYTES = 4096
CAMERA_COMMANDS = ("feedback", "calibrate")  # <prefix>/<camera>/<name>/set
NODE_COMMANDS = ("model",)  # <prefix>/<name>/set
LABELS = {"ok": "good", "defect": "defect"}  # label -> the folder it is filed in
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class CommandError(UserError, ValueError):
    """A refused command payload; the text goes to ``<prefix>/error``."""


def is_command(camera: str | None, name: str) -> bool:
    return name in (CAMERA_COMMANDS if camera else NODE_COMMANDS)


def _text(payload: bytes, what: str) -> str:
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes is too long (at most {MAX_COMMAND_BYTES})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError(f"{what}; got bytes that are not UTF-8 text") from None
    if not text:
        raise CommandError(f"{what}; got an empty message")
    return text


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    text = _text(payload, what)
    try:
        doc: Any = json.loads(text)
    except ValueError:
        raise CommandError(f"{what}; got {text[:48]!r}") from None
    if not isinstance(doc, dict):
        raise CommandError(f"{what}; got {type(doc).__name__}")
    return doc


def parse_model_set(payload: bytes) -> str:
    """The bundle folder of a ``model/set``: an absolute path on the daemon's machine, as plain
    text or JSON ``{"path": "/opt/haloae/bundles/line7-v2"}``."""
    what = 'model/set takes the absolute path of a bundle folder on this machine, e.g. /opt/haloae/bundles/v2'
    text = _text(payload, what)
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            raise CommandError(f"{what}; got JSON that does not parse") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
            raise CommandError(f'{what}; a JSON payload needs "path" (a string)')
        text = doc["path"].strip()
    if any(ord(c) < 32 for c in text):
        raise CommandError(f"{what}; the path contains control characters")
    if not PurePosixPath(text).is_absolute():
        raise CommandError(f"{what}; got the relative path {text[:64]!r}")
    return text


@dataclass(frozen=True)
class Feedback:
    """A label for one alarm (``event``: its id) or one frame (``frame_id``) of a camera."""

    label: str  # "ok" (a false positive) or "defect" (confirmed)
    event: str | None = None
    frame_id: int | None = None
    note: str = ""
    by: str = ""


def parse_feedback(payload: bytes) -> Feedback:
    """``{"event": "<alarm id>", "label": "ok"}`` or ``{"frame_id": 1812, "label": "defect"}``,
    optional ``"note"`` and ``"by"`` (short strings kept with the evidence)."""
    what = ('feedback/set takes JSON {"event": "<alarm id>", "label": "ok"|"defect"} or '
            '{"frame_id": <n>, "label": "ok"|"defect"}')
    doc = _json_object(payload, what)
    unknown = set(doc) - {"event", "frame_id", "label", "note", "by"}
    if unknown:
        raise CommandError(f"{what}; unknown key(s) {', '.join(sorted(unknown))}")
    label = doc.get("label")
    if label not in LABELS:
        raise CommandError(f"{what}; label must be ok or defect, got {str(label)[:32]!r}")
    event, frame_id = doc.get("event"), doc.get("frame_id")
    if (event is None) == (frame_id is None):
        raise CommandError(f"{what}; give exactly one of event and frame_id")
    if event is not None and not (isinstance(event, str) and _EVENT_ID.match(event)):
        raise CommandError(f"{what}; event must be an alarm id such as line1-cam0-1714637741950-5bded13e")
    if frame_id is not None and (isinstance(frame_id, bool) or not isinstance(frame_id, int) or frame_id < 0):
        raise CommandError(f"{what}; frame_id must be a whole number >= 0")
    note, by = doc.get("note", ""), doc.get("by", "")
    if not isinstance(note, str) or not isinstance(by, str) or len(note) > 500 or len(by) > 100:
        raise CommandError(f"{what}; note (<= 500 characters) and by (<= 100) must be strings")
    return Feedback(label, event, frame_id, note, by)


def parse_calibrate(payload: bytes) -> dict:
    """``{"hours": 8, "false_positive_rate": 0.01}`` (a proposal), ``{"confirm": "<id>"}`` or
    ``{"cancel": true}``."""
    what = ('calibrate/set takes JSON {"hours": H, "false_positive_rate": R} (0 < H <= 168, '
            '0 < R <= 0.5), {"confirm": "<proposal id>"} or {"cancel": true}')
    doc = _json_object(payload, what)
    if set(doc) == {"confirm"} and isinstance(doc["confirm"], str) and re.match(r"^[0-9a-f]{1,32}$", doc["confirm"]):
        return doc
    if doc == {"cancel": True}:
        return doc
    if set(doc) != {"hours", "false_positive_rate"}:
        raise CommandError(f"{what}; got keys {', '.join(sorted(map(str, doc))) or 'none'}")
    hours, rate = doc["hours"], doc["false_positive_rate"]
    for name, v, hi in (("hours", hours, 168.0), ("false_positive_rate", rate, 0.5)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi or v != v:
            raise CommandError(f"{what}; {name} must be a number in (0, {hi:g}], got {str(v)[:32]!r}")
    return {"hours": float(hours), "false_positive_rate": float(rate)}
