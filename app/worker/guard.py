"""Refuse a malformed task message instead of letting it stop the worker.

Celery's consumer copes with an undecodable body, refused content (pickle)
and an unknown task name, but a message of the wrong shape raises in the
worker's main process and ends the worker ("Unrecoverable error"): a JSON
body that is not [args, kwargs, options] (celery.worker.request.Request), or
an unknown task name with no "id" header (Consumer.on_unknown_task). The
unacknowledged message then goes back to the queue and ends the next worker
too, so anyone who can publish to the broker could stop a whole fleet.

Two guards, set by app.celery_config for every task of the fleet's app
(plain Celery tasks included):

- GuardedRequest checks a message before the worker reserves it, and turns
  any fault into InvalidTaskError, which Celery logs and rejects without
  requeueing;
- GuardedConsumer logs and rejects (without requeueing) a message that
  raises anything else on its way in, instead of letting it end the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from numbers import Real
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.message import Message

from app.batch import short_repr

log = logging.getLogger(__name__)


def _problem(request: Request, payload: object) -> str | None:
    """What is wrong with a decoded request that the main process would trip on later."""
    if not isinstance(request.id, str):
        return f"the task id must be a string, not {short_repr(request.id)}"
    if not isinstance(request.args, list | tuple):
        return f"the arguments must be a list, not {short_repr(request.args)}"
    if not isinstance(request.kwargs, dict):
        return f"the keyword arguments must be an object, not {short_repr(request.kwargs)}"
    options = payload[2] if isinstance(payload, list | tuple) and len(payload) == 3 else None
    if options is not None and not isinstance(options, dict):
        return f"the message options must be an object, not {short_repr(options)}"
    limits = request.time_limits
    if (
        not isinstance(limits, list | tuple)
        or len(limits) != 2
        or not all(x is None or (isinstance(x, Real) and not isinstance(x, bool)) for x in limits)
    ):
        return f"timelimit must be [hard, soft] in seconds, not {short_repr(limits)}"
    return None


# celery has no types, so its classes are Any to mypy: the `misc` ignores below.
class GuardedRequest(Request):  # type: ignore[misc]
    def __init__(self, message: Message, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
            # What Request.__init__ unpacked (already decoded: no second decode).
            payload = self._body if self._decoded else message.payload
        except InvalidTaskError:
            raise
        except Exception as exc:
            raise InvalidTaskError(f"malformed task message: {exc!r:.300}") from None
        problem = _problem(self, payload)
        if problem:
            raise InvalidTaskError(f"malformed task message: {problem}")


class GuardedTask(Task):  # type: ignore[misc]
    Request = "app.worker.guard:GuardedRequest"


class GuardedConsumer(Consumer):  # type: ignore[misc]
    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        on_task_received = super().create_task_handler(*args, **kwargs)
        # Lost connections and channels still go up to the consumer, which reconnects.
        passed_on = (*self.connection_errors, *self.channel_errors)

        def guarded(message: Message) -> Any:
            headers = message.headers
            if isinstance(headers, dict) and "task" in headers:  # protocol 2
                task, task_id = headers.get("task"), headers.get("id")
                if not isinstance(task, str) or not isinstance(task_id, str):
                    return self.on_invalid_task(
                        None,
                        message,
                        InvalidTaskError(
                            f"malformed task message: the task name and id must be strings, "
                            f"not {short_repr(task)} and {short_repr(task_id)}"
                        ),
                    )
            try:
                return on_task_received(message)
            except passed_on:
                raise
            except Exception as exc:
                log.error(
                    "refused a malformed task message (headers %s): %r",
                    short_repr(headers),
                    exc,
                    exc_info=True,
                )
                if not message.acknowledged:
                    message.reject_log_error(log, self.connection_errors)
                return None

        return guarded
