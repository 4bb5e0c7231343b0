"""What the CLIs in this folder share (Python puts a script's own folder first on sys.path, so they import it as `_cli`)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written (its example commands keep their lines), and every flag's default."""
