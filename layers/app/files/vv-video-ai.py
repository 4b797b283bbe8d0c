#!/usr/bin/python3
"""Stand-in for the VV-Video-AI-System service until its real code is provided.

Same shape as the real application: a systemd service reading /etc/vv-video-ai/.env (rendered per device
from DEVICE_ID, DVR_IP, ...) and answering GET /health on localhost with 200 and a JSON body when its
configuration is complete, 503 otherwise. Health checks after an update test this endpoint.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENV_FILE = os.environ.get("VV_ENV_FILE", "/etc/vv-video-ai/.env")
REQUIRED = ("DEVICE_ID", "DVR_IP")


def load_env(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip().strip('"')
    return values


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            self.send_error(404)
            return
        try:
            env = load_env(ENV_FILE)
            missing = [k for k in REQUIRED if not env.get(k)]
            status = {"status": "ok" if not missing else "misconfigured", "missing": missing,
                      "device_id": env.get("DEVICE_ID"), "version": env.get("VV_VERSION")}
            code = 200 if not missing else 503
        except OSError as e:
            status, code = {"status": "error", "error": str(e)}, 503
        body = json.dumps(status).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("vv-video-ai: " + fmt % args + "\n")


def main():
    port = int(os.environ.get("VV_HEALTH_PORT", "8081"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"vv-video-ai: serving /health on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
