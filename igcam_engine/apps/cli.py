"""The `igcam` command: one registry of commands, each app module adding its own arguments and running them.

User errors (bad arguments, unreadable files, unsupported models) print one line and exit with status 2; with
--verbose, where a command has it, the cause's traceback comes first.
"""
from __future__ import annotations

import importlib
import sys
import traceback

from igcam_engine.apps.arguments import Parser
from igcam_engine.errors import UserError

# the app modules that define commands (COMMANDS), in the order `igcam --help` lists them
COMMAND_MODULES = ("bundles", "explain", "evaluate", "bench", "serve", "batch", "demo")


def parser() -> Parser:
    root = Parser(prog="igcam", description="Integrated Grad-CAM and the CAM family from ONNX graphs "
                  "(docs/cli.md).")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        for command in importlib.import_module(f"igcam_engine.apps.{module}").COMMANDS:
            sub = commands.add_parser(command.name, help=command.help, description=command.description or command.help)
            command.arguments(sub)
            sub.set_defaults(run=command.run)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
    except UserError as e:
        if getattr(args, "verbose", False) and e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"igcam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
