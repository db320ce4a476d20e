"""`FlexibleArgumentParser`: argparse that also accepts `--under_score` spellings of `--dash-options`."""

from __future__ import annotations

import argparse
import sys


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` where `--max_model_len 512` means `--max-model-len 512`, as in vLLM."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(_dashify(list(args)), namespace)


def _dashify(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg.startswith("--") and not arg == "--":
            key, eq, value = arg.partition("=")
            arg = key.replace("_", "-") + eq + value
        out.append(arg)
    return out
