"""What every command shares: the argument parser's exit code, the `-c FILE` option, loading the config."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from gateway import config as configuration
from gateway.errors import EX_USAGE


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors are 64, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


Subparsers = Any  # argparse's _SubParsersAction, which it does not export


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")


def load(path: str) -> configuration.Config | None:
    """The config, or None after printing every problem in it."""
    try:
        return configuration.load(path)
    except configuration.ConfigError as err:
        print(err, file=sys.stderr)
        return None


def prepare(path: str, *, isolate_models: bool = False) -> tuple[configuration.Config, configuration.Prepared] | None:
    """The config and what preflight loaded (models); None after printing every problem."""
    try:
        cfg = configuration.load(path)
    except configuration.ConfigError as err:
        print(configuration.with_files(err), file=sys.stderr)  # the files it names too: every problem at once
        return None
    try:
        return cfg, configuration.preflight(cfg, path, isolate_models=isolate_models)
    except configuration.ConfigError as err:
        print(err, file=sys.stderr)
        return None
