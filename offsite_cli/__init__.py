"""Command-line plumbing shared by the `owner` and `data-owner` CLIs (the library never prints)."""
