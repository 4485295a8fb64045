"""Print one JSON object with a config's parameters, FLOPs and KV-cache figures vs vanilla.

    python tools/model_report.py --config configs/mor_360m_nr3.yaml [model.key=value ...]

The accounting is documented in `mor_megatron.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from mor_megatron.config import ConfigError
from mor_megatron.report import model_report
from mor_megatron.yaml_config import load_model_config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. model.seq_length=4096"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load_model_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"config": args.config, "overrides": list(args.overrides), **model_report(config)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
