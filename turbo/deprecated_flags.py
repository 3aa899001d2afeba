"""Flags renamed for one name per concept: the old spelling keeps working, with a warning, so the
scripts people already have do not break."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_renamed(group: argparse._ActionsContainer, old: str, new: str, **kwargs) -> None:
    """Make `old` (e.g. "--input-kind") a hidden alias of the flag `new` already added to the parser:
    it stores into the same destination and logs a deprecation warning naming `new`."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            logger.warning("%s is deprecated; it is now called %s", old, new)
            setattr(namespace, self.dest, values)

    dest = new.lstrip("-").replace("-", "_")
    group.add_argument(old, dest=dest, action=Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                       **kwargs)  # fmt: skip
