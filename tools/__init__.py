"""Command-line tools around the library: run as `python -m tools.<name>`; nothing in the library imports them."""
