"""The command-line opt-ins for user files that can run code, one definition for every tool."""

__all__ = ["add_trust_arguments"]


def add_trust_arguments(parser, config=True, pickle=True):
    """Add ``--trust-config`` and/or ``--trust-pickle`` to an ``argparse`` parser."""
    if pickle:
        parser.add_argument(
            "--trust-pickle", action="store_true",
            help="read checkpoints (and files a config names, such as proposal files) with full unpickling: "
            "runs any code the file holds, trusted files only",
        )  # fmt: skip
    if config:
        parser.add_argument(
            "--trust-config", action="store_true",
            help="read a YAML config without refusing Python tags, resolvers and _target_ callables outside "
            "the allow-list (soit/config/targets.py): trusted files only",
        )  # fmt: skip
    return parser
