"""``ota-agent``: the device's update agent and its health verdict (argparse: nothing beyond python3 +
python3-cryptography + python3-requests on the device).

    ota-agent daemon            poll the server forever (ota-agent.service)
    ota-agent check-update      one poll now, then exit (0: idle or installed, 1: failure)
    ota-agent install SOURCE    install a local file or URL without a server, arm the boot; --reboot
    ota-agent health            health checks; in a trial boot commit or roll back (ota-health.service)
    ota-agent deadline          reboot a trial boot that has no verdict yet (ota-deadline.timer)
    ota-agent show              the boot state, the slots and the agent's state as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ota_common.errors import OTAError

from .config import DEFAULT_CONFIG, agent_environment, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ota-agent", description="A/B update agent")
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="configuration file")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("daemon", help="poll the server forever")
    sub.add_parser("check-update", help="poll once")
    ins = sub.add_parser("install", help="install an artifact file or URL without a server")
    ins.add_argument("source")
    ins.add_argument("--allow-downgrade", action="store_true")
    ins.add_argument("--reboot", action="store_true", help="reboot into the new slot when armed")
    sub.add_parser("health", help="health checks; commit or roll back a trial boot")
    sub.add_parser("deadline", help="reboot a trial boot without a verdict")
    sub.add_parser("show", help="print the state as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(name)s: %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
        for ignored in agent_environment(cfg, os.environ):
            logging.getLogger("ota-agent").error("agent environment: ignored %s (only proxy variables)", ignored)
        if args.command in ("health", "deadline"):
            from .health import HealthRun, deadline_reached

            return HealthRun(cfg).verdict() if args.command == "health" else deadline_reached(cfg)
        from .agent import Agent

        if args.command in ("daemon", "check-update", "install"):
            _hold_agent_lock(cfg.state_dir)
        agent = Agent(cfg)
        if args.command == "daemon":
            agent.run()
            return 0
        if args.command == "check-update":
            result = agent.run(once=True)
            print(result)
            return 1 if result == "failure" else 0
        if args.command == "install":
            result = agent.install_local(args.source, allow_downgrade=args.allow_downgrade, reboot=args.reboot)
            print(result)
            return 1 if result == "failure" else 0
        if args.command == "show":
            print(json.dumps(agent.show(), indent=1, sort_keys=True))
            return 0
    except OTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 2


_LOCK: object = None


def _hold_agent_lock(state_dir: Path) -> None:
    """One agent process changes the state at a time (the daemon, or ``check-update``/``install`` when it is
    not running): held until the process ends. Raises OTAError naming the holder's kind when it is taken."""
    import fcntl

    global _LOCK
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OTAError(f"another ota-agent (the daemon?) is using {state_dir}; stop it first "
                       "(systemctl stop ota-agent)") from None
    _LOCK = f


if __name__ == "__main__":
    sys.exit(main())
