#!/usr/bin/env python3
"""The release engineer's single entry point: ``python build.py --help``."""

from __future__ import annotations

import click

from cli import fleet_config, fleet_deploy, fleet_devices  # noqa: F401  (their commands join the fleet group)
from cli.artifact import artifact
from cli.common import ErrorHandlingGroup, setup_logging
from cli.demo import demo
from cli.fleet import fleet
from cli.keys import keys
from cli.provision import provision
from cli.publish import publish_command
from cli.release import image, release, rootfs
from cli.server import server
from ota_common.runtime import tune_malloc_for_streaming


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """A/B image-based OTA build and update pipeline for Raspberry Pi fleets."""
    setup_logging(verbose)
    tune_malloc_for_streaming()


main.add_command(keys)
main.add_command(artifact)
main.add_command(release)
main.add_command(rootfs)
main.add_command(image)
main.add_command(demo)
main.add_command(server)
main.add_command(publish_command)
main.add_command(fleet)
main.add_command(provision)

if __name__ == "__main__":
    main()
