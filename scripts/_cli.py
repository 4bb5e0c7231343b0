"""What the thin CLIs in this folder share (each runs with this folder first on sys.path)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written (its example commands keep their lines), and every flag's default."""
