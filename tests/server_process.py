"""The update server as a subprocess: see :mod:`ota_server.process`."""

from ota_server.process import MGMT, OtaServer, Response, free_port

__all__ = ["MGMT", "OtaServer", "Response", "free_port"]
