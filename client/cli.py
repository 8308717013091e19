"""The ``jumplora`` command. Commands that talk to a server use ``client.api`` over HTTP; ``serve``, ``eval``,
``bench`` and ``export --store`` hand over to the server or benchmark packages in a fresh interpreter image
(``os.execv`` of ``python -m ...``), so that the client never imports the server or torch."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .api import DEFAULT_TIMEOUT, Client, Job, Task
from .errors import JumploraError

# Commands handed over as they are (their own --help): jumplora <command> ARGS -> python -m <module...> ARGS
EXEC = {"serve": ["server", "serve"], "eval": ["benchmarks.cl"]}
BENCH = {"serve": "benchmarks.serving", "learn": "benchmarks.learning"}

URL_HELP = "server URL (default: $JUMPLORA_URL, else http://127.0.0.1:8000)"
CONFIG_OPTIONS = [  # (option, type, choices, help) of `learn`; the dest is the training config key
    ("--method", str, ["jumplora", "lora"], "adapter kind (default jumplora)"),
    ("--regularizer", str, ["incremental", "ella"], "continual-learning regularizer (default incremental)"),
    ("--rank", int, None, "LoRA rank (default 8)"),
    ("--alpha", float, None, "LoRA alpha (default 32)"),
    ("--targets", lambda s: [t.strip() for t in s.split(",") if t.strip()], None,
     "comma-separated projections to adapt (default q_proj,v_proj)"),
    ("--learning-rate", float, None, "learning rate (default 1e-3)"),
    ("--epochs", int, None, "epochs (default 1)"),
    ("--batch-size", int, None, "batch size (default 32)"),
    ("--max-steps", int, None, "stop after this many steps"),
    ("--threshold-mode", str, ["global", "per_block"], "JumpReLU threshold (default global)"),
    ("--gate", str, ["budget", "adaptive"], "budget: at most N_LoRA non-zeros (default); adaptive: the paper's "
     "learned threshold"),
    ("--parent", str, None, "train on top of and serve with: @stack (default), @base or a task's name"),
    ("--ella-lambda", float, None, "ELLA penalty weight (default 3e4)"),
    ("--seed", int, None, "training seed (default 0)"),
    ("--eval-fraction", float, None, "fraction of rows held out for evaluation (default 0.1)"),
    ("--max-seq-len", int, None, "longest prompt + completion in tokens (default 512)"),
]


class UsageError(JumploraError):
    """A combination of options argparse cannot express; exits 2 like argparse's own errors."""


def _exec(module_args: list[str], rest: list[str]):
    os.execv(sys.executable, [sys.executable, "-m", *module_args, *rest])


# -- output helpers -----------------------------------------------------------------------------------------------

def _fmt(value, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned on their widest cell, two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _steps(job: Job) -> str:
    return f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step)


def tasks_table(tasks: list[Task]) -> str:
    rows = [[t.name, _fmt(t.order), _fmt(t.method), _fmt(t.regularizer), _fmt(t.density, ".4f"),
             _fmt(t.nonzero_params), _fmt(t.overlap_ratio, ".3f"), _fmt(t.metrics.get("heldout_exact_match"), ".3f")]
            for t in tasks]
    return table(["NAME", "ORDER", "METHOD", "REGULARIZER", "DENSITY", "NONZERO", "OVERLAP", "HELDOUT_EM"], rows)


def jobs_table(jobs: list[Job]) -> str:
    rows = [[j.id, j.task, j.status, _steps(j), _fmt(j.loss, ".4f"), _fmt(j.density, ".4f"),
             _duration(j.eta_s) if j.status == "running" else "-", _fmt(j.error)] for j in jobs]
    return table(["ID", "TASK", "STATUS", "STEP", "LOSS", "DENSITY", "ETA", "ERROR"], rows)


def progress_line(job: Job, width: int = 24) -> str:
    """One line of a job's progress: status, bar, step/total, loss, density, ETA."""
    head = f"{job.id} {job.task} {job.status}"
    if job.status == "queued" or (job.status == "running" and not job.step and not job.total_steps):
        return head
    parts = [head]
    if job.total_steps:
        filled = min(width, int(width * job.step / job.total_steps))
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {job.step}/{job.total_steps}")
    else:
        parts.append(f"step {job.step}")
    if job.loss is not None:
        parts.append(f"loss {job.loss:.4f}")
    if job.density is not None:
        parts.append(f"density {job.density:.4f}")
    if job.status == "running" and job.eta_s is not None:
        parts.append(f"eta {_duration(job.eta_s)}")
    if job.error:
        parts.append(f"error: {job.error}")
    return "  ".join(parts)


class Progress:
    """``on_progress`` of ``Job.wait``: redrawn in place with \\r on a terminal, one line per change otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = 0

    def __call__(self, job: Job) -> None:
        line = progress_line(job)
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


# -- commands -----------------------------------------------------------------------------------------------------

def _client(args) -> Client:
    return Client(args.url, timeout=args.timeout, api_key=args.api_key)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    out = sys.stdout
    with _client(args) as c:
        if args.no_stream:
            out.write(c.generate(args.task, prompt, **params).text)
        else:
            started = False
            try:
                for piece in c.stream(args.task, prompt, **params):
                    started = True
                    out.write(piece)
                    out.flush()
            except JumploraError:
                if started:
                    out.write("\n")
                    out.flush()
                raise
    out.write("\n")
    out.flush()
    return 0


def learn_config(args) -> dict:
    """The training config of ``learn``: ``--config``, then only the options that were given."""
    config = {}
    if args.config:
        try:
            config = json.loads(args.config)
        except ValueError as e:
            raise UsageError(f"--config is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UsageError("--config must be a JSON object")
    for option, *_ in CONFIG_OPTIONS:
        key = option[2:].replace("-", "_")
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def cmd_learn(args) -> int:
    config = learn_config(args)
    if not os.path.isfile(args.file):
        raise JumploraError(f"{args.file}: no such file")
    with _client(args) as c:
        job = c.learn(args.name, args.file, config or None)
        print(job.id, flush=True)
        if not args.wait:
            return 0
        progress = Progress()
        try:
            job.wait(poll=args.poll, on_progress=progress)
        except JumploraError:
            progress.end()
            raise
        except KeyboardInterrupt:
            progress.end()
            print(f"jumplora: stopped watching; the job keeps running (jumplora cancel {job.id})", file=sys.stderr)
            return 130
        progress.end()
    if job.status != "succeeded":
        print(f"jumplora: job {job.id} was {job.status}", file=sys.stderr)
        return 1
    if job.metrics:
        print(table(["METRIC", "VALUE"], [[k, _fmt(v, ".4g") if isinstance(v, float) else _fmt(v)]
                                          for k, v in sorted(job.metrics.items())]))
    return 0


def cmd_tasks(args) -> int:
    with _client(args) as c:
        tasks = c.tasks()
    print(json.dumps({"tasks": [t.raw for t in tasks]}, indent=2) if args.json else tasks_table(tasks))
    return 0


def cmd_jobs(args) -> int:
    with _client(args) as c:
        jobs = c.jobs()
    print(json.dumps({"jobs": [j.raw for j in jobs]}, indent=2) if args.json else jobs_table(jobs))
    return 0


def cmd_models(args) -> int:
    with _client(args) as c:
        print("\n".join(c.models()))
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        health = c.health()
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        ready = health["readyz"]
        print(f"live, {'ready' if health['ready'] else 'not ready'}: "
              + ", ".join(f"{k} {v}" for k, v in ready.items() if k != "status"))
    return 0 if health["ready"] else 1


def cmd_cancel(args) -> int:
    with _client(args) as c:
        job = c.cancel(args.job_id)
    print(f"{job.id}: cancelled" if job.status == "cancelled" else f"{job.id}: cancel requested ({job.status})")
    return 0


def cmd_delete(args) -> int:
    with _client(args) as c:
        deleted = c.delete_task(args.name)
    print(f"{deleted.get('name', args.name)}: no longer served" + (f" (moved to {deleted['trash']})"
                                                                    if deleted.get("trash") else ""))
    return 0


def cmd_export(args) -> int:
    if args.store and args.url:
        raise UsageError("export takes --url or --store, not both")
    if args.store:
        rest = ["--store", args.store] + (["--model", args.model] if args.model else []) + [args.name, args.out_dir]
        _exec(["server.export"], rest)
    if args.model:
        raise UsageError("--model goes with --store (a server export uses the server's model)")
    with _client(args) as c:
        files = c.export(args.name, args.out_dir)
    print(f"exported {args.name} to {args.out_dir} ({len(files)} files: {', '.join(files)})")
    return 0


# -- parser ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=None, help=URL_HELP)
    conn.add_argument("--api-key", default=None, help="API key, sent as a bearer token (default: $JUMPLORA_API_KEY)")
    conn.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})")

    parser = argparse.ArgumentParser(
        prog="jumplora", description="Serve one frozen LM through many sparse task adapters, learn new tasks "
        "while serving, and talk to such a server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("serve", add_help=False, help="start the server (python -m server serve; see its --help)")
    sub.add_parser("eval", add_help=False, help="continual-learning evaluation (python -m benchmarks.cl)")
    p = sub.add_parser("bench", help="benchmarks: `bench serve ...` (python -m benchmarks.serving) or "
                       "`bench learn ...` (python -m benchmarks.learning)",
                       description="Run a benchmark; the arguments after serve/learn go to the benchmark script.")
    p.add_argument("which", choices=sorted(BENCH), help="which benchmark")
    p.set_defaults(func=lambda a: _exec([BENCH[a.which]], []))

    p = sub.add_parser("generate", parents=[conn], help="generate text, streamed to stdout",
                       description="Generate text through a task, @stack or @base, streamed to stdout as it arrives.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--task", "-t", default="@base", help="a task name, @stack or @base (default @base)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="tokens to generate at most (server default 32)")
    p.add_argument("--temperature", type=float, help="0 is greedy decoding (the default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", metavar="S", help="a stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("learn", parents=[conn], help="learn a new task from a JSONL file",
                       description="Queue a training job for a new task from a JSONL file of "
                       '{"prompt", "completion"} rows and print its job id. Only the options given go into the '
                       "training config (the server's defaults fill the rest).")
    p.add_argument("name", metavar="NAME", help="the new task's name")
    p.add_argument("file", metavar="FILE", help="the dataset, one JSON object per line")
    for option, kind, choices, help_text in CONFIG_OPTIONS:
        metavar = None if choices else {int: "N", float: "X", str: "NAME"}.get(kind, "A,B")
        p.add_argument(option, type=kind, choices=choices, help=help_text, metavar=metavar)
    p.add_argument("--config", metavar="JSON", help="a training config object; the options above override it")
    p.add_argument("--wait", action="store_true", help="follow the job (progress on stderr), then print its metrics")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls with --wait (default 1)")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("tasks", parents=[conn], help="list served tasks", description="List the served tasks.")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("jobs", parents=[conn], help="list training jobs", description="List training jobs.")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cancel", parents=[conn], help="cancel a queued or running job",
                       description="Cancel a queued or running training job (nothing is registered).")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("delete", parents=[conn], help="stop serving a task",
                       description="Stop serving a task; the server moves its adapter to the store's trash and "
                       "recomputes @stack.")
    p.add_argument("name", metavar="TASK")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("models", parents=[conn], help="list the names requests may use",
                       description="List @base, @stack and every served task.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("health", parents=[conn], help="liveness and readiness of a server",
                       description="Check /healthz and /readyz; exit 1 while the server is not ready.")
    p.add_argument("--json", action="store_true", help="print both answers as JSON")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("export", parents=[conn], help="write a task or @stack as a transformers checkpoint",
                       description="Write the base model with a task's (or @stack's) delta merged in as a "
                       "transformers checkpoint folder: downloaded from a server (--url, the default), or built "
                       "locally from a store (--store, runs python -m server.export).")
    p.add_argument("name", metavar="TASK|@stack")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (absent or empty)")
    p.add_argument("--store", metavar="DIR", help="build from this adapter store instead of asking a server")
    p.add_argument("--model", metavar="PATH", help="with --store: the base model folder (default: the default model)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXEC:
        _exec(EXEC[argv[0]], argv[1:])
    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCH:
        _exec([BENCH[argv[1]]], argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JumploraError as e:
        print(f"jumplora: {e.message}", file=sys.stderr)
        if isinstance(e, UsageError):
            return 2
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:  # e.g. the dataset file cannot be read
        print(f"jumplora: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
