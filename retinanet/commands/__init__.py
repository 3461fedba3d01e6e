"""Subcommands of the `retinanet` CLI (see retinanet/cli.py)."""
