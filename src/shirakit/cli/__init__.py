"""The shirakit command: train, eval, switch, fuse, inspect, orthogonality, bench, demo, serve.

Every subcommand has ``--help`` (with defaults). Bad arguments and bad inputs are one line on
stderr and exit status 2, checked before any model loads; ``SHIRAKIT_DEBUG=1`` shows tracebacks.
A missing optional package is one line naming the extra to install (:mod:`shirakit.core.extras`).
Known start-up messages of other libraries are hidden (:mod:`.quiet`; ``--verbose`` shows them).
Subcommand modules import torch and transformers only when they run, so ``--help`` is fast.

Adding a subcommand: a module in this package with ``register(subparsers)`` (which sets
``func``; ``add_parser(..., populate=f)`` defers ``f(parser)`` to first use, for heavy imports),
listed in ``SUBCOMMANDS``; ``func`` may return an exit status. A module may also define
``expand(argv, parser)`` to rewrite its arguments before parsing (``train`` turns a recipe into flags).
"""

from __future__ import annotations

import importlib
import os
import sys

from ..core.extras import missing_extra
from .common import Parser, UsageError
from .quiet import hide_known_noise, verbose_requested

# subcommand -> module in this package, in the order --help lists them
SUBCOMMANDS = {
    "train": "train_cmd",
    "eval": "adapter_cmds",
    "switch": "adapter_cmds",
    "fuse": "adapter_cmds",
    "inspect": "adapter_cmds",
    "orthogonality": "adapter_cmds",
    "bench": "tools",
    "demo": "tools",
    "serve": "serve_cmd",
}


def _modules():
    return [importlib.import_module(f".{name}", __name__) for name in dict.fromkeys(SUBCOMMANDS.values())]


def build_parser() -> Parser:
    parser = Parser(prog="shirakit", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the known start-up messages of other "
                        "libraries that shirakit hides (torchao's CUDA kernels on CPU, ...; see shirakit.cli.quiet); "
                        "also SHIRAKIT_VERBOSE=1")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in _modules():
        module.register(sub)
    return parser


def _subparser(parser: Parser, command: str) -> Parser:
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _report(message) -> int:
    text = str(message).strip()
    print(f"shirakit: error: {text.splitlines()[0] if text else type(message).__name__}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never a silent download
    verbose = bool(argv) and argv[0] == "--verbose"
    if verbose:
        argv = argv[1:]  # a top-level flag: the subcommand comes next
    if not (verbose or verbose_requested()):
        hide_known_noise()
    parser = build_parser()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            module = importlib.import_module(f".{SUBCOMMANDS[argv[0]]}", __name__)
            if hasattr(module, "expand"):
                argv = [argv[0], *module.expand(argv[1:], _subparser(parser, argv[0]))]
        args = parser.parse_args(argv)
        status = args.func(args)
        return status if isinstance(status, int) else 0
    except UsageError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:  # an optional package: one line naming the extra that installs it
        hint = missing_extra(exc, f"shirakit {argv[0]}" if argv else "shirakit")
        if hint is None or os.environ.get("SHIRAKIT_DEBUG"):
            raise
        return _report(hint)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        if os.environ.get("SHIRAKIT_DEBUG"):
            raise
        return _report(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)


if __name__ == "__main__":
    sys.exit(main())
