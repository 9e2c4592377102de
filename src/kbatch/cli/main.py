"""Entry points: argument parsing and the one error handler of the CLI."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kbatch import __version__
from kbatch.errors import KbatchError

if TYPE_CHECKING:  # argparse is imported when a parser is built: `kbatch submit` needs none
    import argparse

__all__ = ["kqueue_main", "main"]

Handler = Callable[["argparse.Namespace"], int]

DESCRIPTION = """\
sbatch and squeue for JupyterHub: submit scripts as batch jobs that outlive
your session, on Kubernetes or on this machine.

  kbatch submit train.sh          submit a script (#SBATCH lines are honoured)
  kbatch submit --wrap "CMD"      submit a one-line command
  kqueue                          your pending and running jobs (kbatch queue)
  kbatch logs -f ID               follow a job's output
  kbatch cancel ID                stop a job
  kbatch submit --code DIR S.sh   run S.sh in a copy of DIR; kbatch fetch ID gets its results
  kbatch hold ID / release ID     keep a pending job from starting / let it start

Arrays: kbatch submit --array=0-99%10 (or --params FILE.csv) runs one task per index;
  ID_7 is task 7, ID_[1-5,9] some tasks; kbatch update ID --throttle N;
  kbatch resubmit ID --failed runs just the tasks that failed again.
"""


def _lazy(module: str, function: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        handler: Handler = getattr(importlib.import_module(module), function)
        return handler(args)

    return run


def _add_queue_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-a", "--all", action="store_true", help="include finished jobs")
    parser.add_argument(
        "-t",
        "--states",
        metavar="STATE[,STATE]",
        help="only jobs in these states (e.g. RUNNING,PENDING)",
    )
    parser.add_argument(
        "-u", "--all-users", action="store_true", help="every user's jobs (admins only)"
    )
    parser.add_argument(
        "-r",
        "--array",
        action="store_true",
        help="one row per task of an array (default: its tasks not started on one row)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list (one per task)")
    parser.set_defaults(handler=_lazy("kbatch.cli.queue", "queue"))


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="kbatch", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kbatch {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    submit = commands.add_parser(
        "submit", help="submit a batch script (see kbatch submit --help)", add_help=False
    )
    submit.add_argument("words", nargs=argparse.REMAINDER)
    submit.set_defaults(handler=_lazy("kbatch.cli.submit", "submit"))

    queue = commands.add_parser("queue", help="list your jobs, like squeue (also: kqueue)")
    _add_queue_options(queue)

    show = commands.add_parser("show", help="show one job in detail")
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument(
        "--tasks", action="store_true", help="an array: each task's state and exit code"
    )
    show.set_defaults(handler=_lazy("kbatch.cli.queue", "show"))

    logs = commands.add_parser("logs", help="print a job's output")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("-e", "--error", action="store_true", help="the error file (with submit -e)")
    logs.set_defaults(handler=_lazy("kbatch.cli.jobs", "logs"))

    fetch = commands.add_parser(
        "fetch", help="download what a job (submitted with --code) left: new or changed files"
    )
    fetch.add_argument("job_id", metavar="ID")
    fetch.add_argument("dest", metavar="DEST", nargs="?", help="where to (default ./kbatch-ID/)")
    fetch.add_argument(
        "--results",
        metavar="PATTERN",
        action="append",
        help="only files matching PATTERN (gitignore style, e.g. '*.csv'; repeatable)",
    )
    fetch.add_argument(
        "--ignore", metavar="PATTERN", action="append", help="leave out files matching PATTERN"
    )
    fetch.add_argument(
        "-q", "--quiet", "--parsable", action="store_true", help="print nothing, draw no bar"
    )
    fetch.set_defaults(handler=_lazy("kbatch.cli.fetch", "fetch"))

    cancel = commands.add_parser("cancel", help="cancel jobs, like scancel")
    cancel.add_argument("job_ids", metavar="ID", nargs="+")
    cancel.set_defaults(handler=_lazy("kbatch.cli.jobs", "cancel"))

    hold = commands.add_parser("hold", help="keep pending jobs from starting, like scontrol hold")
    hold.add_argument("job_ids", metavar="ID", nargs="+")
    hold.set_defaults(handler=_lazy("kbatch.cli.jobs", "hold"))

    release = commands.add_parser("release", help="let held jobs start, like scontrol release")
    release.add_argument("job_ids", metavar="ID", nargs="+")
    release.set_defaults(handler=_lazy("kbatch.cli.jobs", "release"))

    update = commands.add_parser("update", help="change a running array, like scontrol update")
    update.add_argument("job_id", metavar="ID")
    update.add_argument(
        "--throttle", metavar="N", help="run at most N tasks at once (0 or none: no limit)"
    )
    update.set_defaults(handler=_lazy("kbatch.cli.tasks", "update"))

    resubmit = commands.add_parser(
        "resubmit", help="submit an array's failed tasks again, with the same indexes"
    )
    resubmit.add_argument("job_id", metavar="ID")
    resubmit.add_argument(
        "--failed",
        action="store_true",
        help="the tasks that ended FAILED, OUT_OF_MEMORY, TIMEOUT or NODE_FAIL",
    )
    resubmit.add_argument(
        "--state", metavar="STATE[,STATE]", help="the tasks that ended so (e.g. TIMEOUT)"
    )
    resubmit.add_argument("--parsable", action="store_true", help="print the new id alone")
    resubmit.set_defaults(handler=_lazy("kbatch.cli.tasks", "resubmit"))

    configure = commands.add_parser("configure", help="point the client at a server")
    configure.add_argument(
        "--url", help="the server's URL, e.g. https://hub.example.org/services/kbatch"
    )
    configure.add_argument("--token", help="an API token (default: KBATCH_TOKEN, or none)")
    configure.add_argument("--show", action="store_true", help="show what the client would use")
    configure.set_defaults(handler=_lazy("kbatch.cli.configure", "configure"))

    dashboard = commands.add_parser(
        "dashboard", help="open the web dashboard (prints a one-time login link)"
    )
    dashboard.add_argument(
        "--no-browser", action="store_true", help="print the link only; do not open a browser"
    )
    dashboard.set_defaults(handler=_lazy("kbatch.cli.dashboard", "dashboard"))

    whoami = commands.add_parser("whoami", help="who the server thinks you are")
    whoami.set_defaults(handler=_lazy("kbatch.cli.configure", "whoami"))

    server = commands.add_parser(
        "server", help="run the kbatch server (foreground unless --background)"
    )
    server.add_argument(
        "action",
        nargs="?",
        choices=["run", "stop", "status", "add-token"],
        default="run",
        help="run (default), stop or status of the server, or add-token USER",
    )
    server.add_argument("user", nargs="?", help="with add-token: the user the token is for")
    server.add_argument("--admin", action="store_true", help="with add-token: an admin token")
    server.add_argument(
        "--background", "-b", action="store_true", help="detach and return once it answers"
    )
    server.add_argument("--config", help="a TOML config file")
    server.add_argument(
        "--state-dir", help="where jobs and tokens are kept (default ~/.local/state/kbatch)"
    )
    server.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    server.add_argument(
        "--port", type=int, help="port (default: any free one, written to server.json)"
    )
    server.add_argument(
        "--backend",
        metavar="NAME",
        help="where jobs run: local (default), kubernetes, or an import path mypkg.mod:Backend",
    )
    server.add_argument(
        "--auth",
        choices=["token", "jupyterhub"],
        help="who may call: token (default; tokens kept by the server) or jupyterhub "
        "(hub tokens; run as a hub service, see docs/jupyterhub.md)",
    )
    server.add_argument("--cpus", type=int, help="local backend: CPUs to use (default: all)")
    server.add_argument("--memory", help="local backend: memory to use, e.g. 16G (default: all)")
    server.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    server.set_defaults(handler=_lazy("kbatch.cli.server", "server"))
    return parser


def run(argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


def _guarded(body: Callable[[], int]) -> int:
    try:
        return body()
    except KbatchError as exc:
        print(f"kbatch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kbatch logs ID | head`: the reader left; that is fine.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["submit"]:
        # sbatch's grammar (options, SCRIPT, the script's own arguments) is parsed by
        # kbatch.directives with the same table as #SBATCH lines: no argparse to import.
        from kbatch.cli.submit import submit_words

        return _guarded(lambda: submit_words(words[1:]))
    return _guarded(lambda: run(words, build_parser()))


def kqueue_main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="kqueue", description="Your pending and running kbatch jobs."
    )
    _add_queue_options(parser)
    words = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: run(words, parser))


if __name__ == "__main__":
    sys.exit(main())
