"""The `obi` command line (also `python -m obi`)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys

from . import __version__
from . import config as config_mod
from .errors import ObiError

log = logging.getLogger("obi.cli")


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .agent import Agent

    cfg = _load(args)
    logs.setup(cfg)
    return Agent(cfg).run()


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    cfg = _load(args)
    checks = doctor.run_checks(cfg)
    if args.json:
        print(json.dumps(doctor.report_json(checks), indent=2))
    else:
        print(doctor.report_text(checks))
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    config_mod.load(args.file, env={})
    print(f"{args.file}: ok")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    shown = cfg.as_dict()
    sources = {k.yaml: cfg.sources.get(k.attr, "default") for k in config_mod._KEYS}
    if args.json:
        print(json.dumps({"config": shown, "sources": sources}, indent=2, default=str))
    else:
        width = max(len(k) for k in shown)
        for key, value in shown.items():
            print(f"{key:<{width}}  {value!s:<24}  ({sources[key]})")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what a killed agent left attached, and only that."""
    done: list[str] = []
    from .kernel import attach

    done += attach.cleanup()
    from .fallback import rules

    done += rules.cleanup()
    for line in done:
        print(line)
    if not done:
        print("nothing to clean up")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"obi-py {__version__} (Python {platform.python_version()}, Linux {platform.release()})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import scenario as demo

    return demo.main(datapath=args.datapath, requests=args.requests, output=args.output)


def run_bench(rest: list[str]) -> int:
    """`obi bench ARGS` = `python3 -m bench ARGS`, from the repository root (bench/ is not
    part of the installed package)."""
    import os
    import runpy

    sys.path.insert(0, os.getcwd())
    try:
        import bench  # noqa: F401
    except ImportError:
        print("obi bench: run it from the repository root (bench/ is not installed)", file=sys.stderr)
        return 2
    sys.argv = ["bench", *rest]
    try:
        runpy.run_module("bench", run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="obi", description="Zero-code distributed tracing for HTTP services.")
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: $OTEL_EBPF_CONFIG_PATH)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="attach and trace until SIGINT/SIGTERM").set_defaults(func=cmd_run)

    d = sub.add_parser("doctor", help="what this kernel can do and which datapath would be used")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser("config", help="validate or show configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config file (environment ignored)")
    v.add_argument("file")
    v.set_defaults(func=cmd_config_validate)
    s = csub.add_parser("show", help="the effective configuration and where each value came from")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config_show)

    sub.add_parser("cleanup", help="remove leftovers of an agent that was killed").set_defaults(func=cmd_cleanup)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)

    m = sub.add_parser("demo", help="trace a demo topology in network namespaces and print the spans")
    m.add_argument("--datapath", choices=("auto", "kernel", "userspace"), default="auto")
    m.add_argument("--requests", type=int, default=3, help="requests per scenario")
    m.add_argument("--output", choices=("text", "json"), default="text")
    m.set_defaults(func=cmd_demo)

    # `bench` forwards its arguments untouched; main() routes it before parsing, this
    # entry is only for --help.
    sub.add_parser("bench", help="benchmarks: kernel vs userspace vs uninstrumented (see bench/README.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ObiError as e:
        print(f"obi: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
