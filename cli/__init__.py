"""The click commands behind ``build.py``. Each command is thin: it parses options and calls a package."""
