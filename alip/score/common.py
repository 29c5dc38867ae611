"""What every part of `alip.score` shares: its user error, its logger and the warnings list."""

from __future__ import annotations

import logging

from alip.cli import UserError

# One logger for the whole package, named as the module was before the split, so log lines and
# logging filters still say `alip.score`.
logger = logging.getLogger("alip.score")


class ScoreInputError(UserError, ValueError):
    """A problem with what alip-score was given (a truth or texts file, an option); the message says which."""


class _Warnings(list):
    """Warnings logged once each and kept for the summary."""

    def add(self, message: str) -> None:
        if message not in self:
            logger.warning(message)
            self.append(message)
