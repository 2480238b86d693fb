"""The `smarter` command line."""
