"""The publisher's handling of ``set`` topics: settings (a value applied at once, its retained
``.../<setting>/state``) and commands (checked, handed to the daemon; the outcome follows on the
command's ``state`` topic). Refusals go to ``<prefix>/error`` (docs/mqtt.md, "Settings")."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from . import topics
from .alarms import SCHEMA_VERSION, iso_utc
from .commands import MAX_COMMAND_BYTES, is_command
from .payloads import dumps, state_text
from .publish_items import Retained, SetRequest
from .settings import MAX_SETTING_BYTES, parse_set, split_topic

log = logging.getLogger(__name__)

SettingCallback = Callable[[str | None, str, Any], None]
CommandCallback = Callable[[str | None, str, bytes], None]


class SetDesk:
    """Applies :class:`SetRequest` items on the publisher's encoder thread.

    ``retain(item)`` publishes a :class:`Retained` at once, ``send_error(payload)`` publishes an
    encoded ``<prefix>/error`` document at once (when connected), ``publish_error(kind, error,
    **fields)`` queues one; ``counters["settings_rejected"]`` counts the refusals.
    """

    def __init__(self, prefix: str, cameras: list[str], on_setting: SettingCallback | None,
                 on_command: CommandCallback | None, *, retain: Callable[[Retained], None],
                 send_error: Callable[[bytes], None], publish_error: Callable[..., None], counters: dict):
        self.prefix, self.cameras = prefix, cameras
        self.on_setting, self.on_command = on_setting, on_command
        self.retain, self.send_error, self.publish_error, self.counters = retain, send_error, publish_error, counters

    def handle(self, req: SetRequest) -> None:
        """A ``set`` message (MQTT, or the live view with ``req.reply`` to report back to)."""
        camera, setting = split_topic(self.prefix, req.topic)
        if is_command(camera, setting):
            return self._command(req, camera, setting)
        try:
            camera, setting, value = parse_set(self.prefix, req.topic, self.cameras,
                                               req.payload[:MAX_SETTING_BYTES + 1], req.size)
            if self.on_setting is not None:
                self.on_setting(camera, setting, value)
        except ValueError as err:  # SettingError, or the daemon's own refusal
            if req.reply is not None:
                req.reply.settle(str(err))
            self.counters["settings_rejected"] += 1
            log.warning("rejected %s: %s", req.topic, err)
            doc = {"v": SCHEMA_VERSION, "kind": "setting", "topic": req.topic, "camera": camera, "setting": setting,
                   "error": str(err), "payload": req.payload[:64].decode("utf-8", "replace"),
                   "timestamp": iso_utc(time.time())}
            self.send_error(dumps(doc))
            return
        log.info("setting %s of %s set to %s %s", setting, camera or "all cameras", value,
                 "over MQTT" if req.reply is None else "from the live view")
        for cam in [camera] if camera else self.cameras:
            self.retain(Retained(topics.state(self.prefix, cam, setting), state_text(value).encode()))
        if req.reply is not None:
            req.reply.settle(None)

    def _command(self, req: SetRequest, camera: str | None, name: str) -> None:
        """A command topic: checked and queued by the daemon (``on_command``); its outcome goes to
        the command's ``state`` topic later. A refusal goes to ``<prefix>/error`` (kind ``command``)."""
        try:
            if camera is not None and camera not in self.cameras:
                raise ValueError(f"unknown camera {camera!r}; cameras: {', '.join(self.cameras)}")
            if req.size > MAX_COMMAND_BYTES:
                raise ValueError(f"payload of {req.size} bytes is too long (at most {MAX_COMMAND_BYTES})")
            if self.on_command is None:
                raise ValueError(f"{name}/{topics.SET} is not handled by this daemon")
            self.on_command(camera, name, req.payload)
        except ValueError as err:  # CommandError, or the daemon's own refusal
            self.counters["settings_rejected"] += 1
            log.warning("rejected %s: %s", req.topic, err)
            self.publish_error("command", str(err), topic=req.topic, camera=camera, command=name,
                               payload=req.payload[:64].decode("utf-8", "replace"))
            if req.reply is not None:
                req.reply.settle(str(err))
            return
        log.info("%s/%s of %s accepted", name, topics.SET, camera or "the node")
        if req.reply is not None:
            req.reply.settle(None)
