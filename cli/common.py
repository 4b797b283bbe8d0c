"""Error policy of the CLI: library code raises typed errors; only here do they become exit codes and one
clear line on stderr. Exit codes: 0 ok, 1 verification/untrusted input, 2 usage or user error, 3 external tool
failed, 4 download failed, 70 internal error (a bug: the traceback is printed)."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import click

from ota_common.errors import OTAError

INTERNAL_ERROR = 70


class ErrorHandlingGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OTAError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug: say so, with the traceback
            traceback.print_exc()
            click.echo(f"internal error: {type(e).__name__}: {e}", err=True)
            ctx.exit(INTERNAL_ERROR)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def progress_line(msg: str) -> None:
    """One line of progress on stderr, ``HH:MM:SS msg``, never wrapped or decorated (a CI log reads the same)."""
    click.echo(f"{time.strftime('%H:%M:%S')} {msg}", err=True)
