"""The ``reslab`` command line.

Each sub-command lives in :mod:`reslab.cli.commands` as a module with ``NAME``, ``HELP``,
``ORDER``, ``add_arguments(parser)`` and ``run(args) -> int``; this file only finds them
and turns user errors into one line on stderr and exit status 2. ``--import MODULE`` (on
any command) imports a module first, e.g. one defining a technique (:mod:`reslab.nn.plugins`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from reslab.errors import UsageError, is_out_of_memory, os_error_message, out_of_memory_message
from reslab.nn import plugins
from reslab.signals import exit_status, handle_sigterm, stop_word
from reslab.version import __version__


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        # No abbreviations: '--seed 3' must not silently become '--seeds 3'.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse already exits 2; keep its one-line form and point at --help.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _commands() -> list[ModuleType]:
    import reslab.cli.commands as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted((m for m in mods if hasattr(m, "run")), key=lambda m: (m.ORDER, m.NAME))


_IMPORT_HELP = (
    "import MODULE before the command runs, e.g. one that registers a technique (repeatable; the current "
    "directory is searched too)"
)


def _add_import_option(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("--import", dest=dest, action="append", default=[], metavar="MODULE", help=_IMPORT_HELP)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; given ``argv``, only the sub-command it names gets its options.

    A sub-command's options can need its heavy modules (torch, for choices such as
    compare's presets), so ``reslab --help`` and ``reslab models`` add none but their own.
    """
    parser = _Parser(prog="reslab", description="Residual techniques for ResNets, measured honestly.")
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    # On both levels, under two names: argparse lets a sub-parser's default replace what
    # the top level parsed into the same name.
    _add_import_option(parser, "_imports_top")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    mods = _commands()
    names = {m.NAME for m in mods}
    chosen = None if argv is None else next((a for a in argv if a in names), "")
    for mod in mods:
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__)
        if chosen is None or chosen == mod.NAME:
            mod.add_arguments(p)
        _add_import_option(p, "_imports")
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    handle_sigterm()  # Slurm's preemption and time limit, kill, systemd: stop like Ctrl-C
    try:
        imports = [*getattr(args, "_imports_top", []), *getattr(args, "_imports", [])]
        with plugins.imported(imports):
            return int(args._run(args) or 0)
    except UsageError as e:
        print(f"reslab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(
            f"reslab {args.command}: {stop_word(e)}; finished results are kept, run the same command again to go on",
            file=sys.stderr,
        )
        return exit_status(e)
    except BrokenPipeError:
        # The reader went away (`reslab predict ... | head`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # a user-given path that cannot be read or written, found while working
        print(f"reslab {args.command}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        message = out_of_memory_message(getattr(args, "batch_size", None))
        print(f"reslab {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
