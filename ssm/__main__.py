"""``python -m ssm --version`` / ``python -m ssm --config``."""
import argparse

from ._config import show_config
from ._version import __version__

parser = argparse.ArgumentParser(prog="python -m ssm", description="ssm: SpatialSoftmaxWithLoss. "
                                 "The benchmark is `ssm-bench` (or `python -m ssm.bench`).")
parser.add_argument("--version", action="version", version=f"ssm {__version__}")
parser.add_argument("--config", action="store_true", help="print the build and runtime configuration")


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    if args.config:
        show_config()
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
