"""Entry point. Bare `containerboot` is the boot program and imports only what booting needs
(containerboot/startup.py); the subcommands (containerboot/commands.py) pay for click, which the boot path
does not load."""

from __future__ import annotations

import sys

from containerboot.startup import boot


def main() -> None:
    if len(sys.argv) <= 1:
        boot()
    from containerboot.commands import commands

    commands()
