"""What runs on the device: boot script, boot-state environment, update agent, health checks.
Only the standard library and Debian's python3-cryptography / python3-requests may be used here."""
