"""`python -m adaptserve.train --help`: the same flags as `adaptserve train`."""

import argparse
import logging
import sys
from collections.abc import Sequence

from adaptserve.cli import add_config_args, config_from_args
from adaptserve.train import TrainConfig, TrainError, train

log = logging.getLogger("adaptserve.train")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptserve.train", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_config_args(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(config_from_args(TrainConfig, args))
    except TrainError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
