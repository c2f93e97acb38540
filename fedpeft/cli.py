"""The ``fedpeft`` command line.

User mistakes (bad config, unknown strategy, missing asset, busy output
folder) end with one line on stderr and exit code 2, before anything is
written; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedpeft.errors import FederationError, FedPeftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Simulate federated parameter-efficient fine-tuning.")
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (default: the embedded default, experiments/default.toml).")
SetOpt = typer.Option(None, "--set", "-s", help="Override one key: section.key=value (TOML value), repeatable.")
OutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<timestamp>-<name>); must be empty or absent.")


@app.callback()
def setup_process() -> None:
    """Simulate federated parameter-efficient fine-tuning."""
    from fedpeft.environment import quiet_environment

    quiet_environment()


def fail(message: str) -> None:
    # escape: messages name sections as "[train]", which rich would eat as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, console=console)


def prepare_out(out: Optional[Path], default: Path) -> Path:
    from fedpeft.server.run_folder import new_output_folder

    try:
        return new_output_folder(out, default, "--out")
    except FedPeftError as exc:
        fail(str(exc))


ResumeOpt = typer.Option(None, "--resume", help="Continue an interrupted run folder from its last checkpoint.")


def resumable(folder: Path):
    """The config of an interrupted run folder, or a user error saying why not."""
    from fedpeft.validation import config_from_dict
    from fedpeft.server.run_folder import SUMMARY, RunFolder

    if not folder.is_dir():
        fail(f"--resume {folder}: no such run folder")
    if (folder / SUMMARY).is_file():
        fail(f"--resume {folder}: this run already finished (it has {SUMMARY})")
    return config_from_dict(RunFolder(folder).checkpoint_config())


@app.command()
def run(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
        resume: Optional[Path] = ResumeOpt) -> None:
    """Run one federation and write its run folder (or finish an interrupted one)."""
    from fedpeft.validation import load_config

    # Validate the config and --out before importing torch and Flower (seconds).
    try:
        if resume is not None:
            if config is not None or set_ or out is not None:
                fail("--resume takes the run's own config: leave out --config, --set and --out")
            cfg = resumable(resume)
        else:
            cfg = load_config(config, set_ or [])
    except FedPeftError as exc:
        fail(str(exc))
    from fedpeft.server.run_folder import default_run_dir

    target = resume if resume is not None else prepare_out(out, default_run_dir(cfg))

    from fedpeft.reporting import round_table
    from fedpeft.runtime import runtime

    try:
        with console.status("loading data and model"):
            # The server runs in this process: loading here first turns a
            # missing asset or a bad target module into a clean error.
            rt = runtime(cfg, threads=cfg.federation.threads or os.cpu_count())
            rt.splits
        if cfg.dp.mode != "none":
            with console.status("planning differential privacy (calibrating the noise)"):
                rt.dp_plan
        if resume is not None:  # every check of the checkpoint, before any engine starts or anything is written
            from fedpeft.server.run_folder import RunFolder

            RunFolder(target).resume_point(rt.model.initial)
    except FedPeftError as exc:
        fail(str(exc))

    from fedpeft.engine import run_engine
    from fedpeft.server.run_folder import RunFolder

    rounds = cfg.federation.num_rounds
    with progress_bar() as progress:
        task = progress.add_task("starting client workers", total=rounds)

        def on_round(line):
            done = line["round"]
            accuracy = "" if line["accuracy"] is None else f"  accuracy {line['accuracy']:.4f}"  # not evaluated (eval_every)
            progress.update(task, completed=done, description=f"round {done}/{rounds}{accuracy}")

        try:
            run_engine(cfg, target, on_round, resume=resume is not None)
        except FederationError as exc:  # a round that could not be completed: the folder keeps its checkpoint
            progress.live.transient = True  # the error line replaces the bar
            progress.stop()
            fail(str(exc).replace("DIR", str(target)))
    metrics = RunFolder(target).read_metrics()
    Console().print(round_table(metrics))
    print(f"run folder: {target}")


@app.command()
def deploy(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
           nodes: int = typer.Option(2, "--nodes", "-n", help="SuperNodes to start (each its own process)."),
           insecure: bool = typer.Option(False, "--insecure", help="No TLS and no SuperNode authentication.")) -> None:
    """Run one federation on Flower's Deployment Engine: a SuperLink and N SuperNodes on this machine.

    By default with TLS (test certificates made for 127.0.0.1) and SuperNode
    authentication (each node's key registered first). Writes the usual run
    folder; the deployment's keys, logs and Flower home go beside it in
    <out>.deploy/. Every process it starts is stopped at the end.
    """
    from fedpeft.validation import load_config

    try:
        cfg = load_config(config, set_ or [])
    except FedPeftError as exc:
        fail(str(exc))
    from fedpeft.deploy.launcher import nodes_problem
    from fedpeft.server.run_folder import default_run_dir

    problem = nodes_problem(cfg, nodes)
    if problem:
        fail(problem)

    target = prepare_out(out, default_run_dir(cfg)).resolve()
    deploy_folder = target.with_name(target.name + ".deploy")
    if deploy_folder.exists():
        fail(f"{deploy_folder} exists (a previous deployment's keys and logs); remove it or choose another --out")
    from fedpeft.deploy import deploy as run_deployment
    from fedpeft.reporting import round_table
    from fedpeft.server.run_folder import RunFolder

    rounds = cfg.federation.num_rounds
    with progress_bar() as progress:
        task = progress.add_task("starting the deployment", total=rounds)

        def on_round(line):
            done = line["round"]
            accuracy = "" if line["accuracy"] is None else f"  accuracy {line['accuracy']:.4f}"
            progress.update(task, completed=done, description=f"round {done}/{rounds}{accuracy}")

        try:
            run_deployment(cfg, target, nodes, insecure, on_round=on_round,
                           on_step=lambda text: progress.update(task, description=text))
        except FedPeftError as exc:
            progress.live.transient = True
            progress.stop()
            fail(str(exc))
    Console().print(round_table(RunFolder(target).read_metrics()))
    print(f"run folder: {target}\ndeployment (keys, logs): {deploy_folder}")


@app.command()
def bench(
    name: Optional[List[str]] = typer.Option(None, "--name", "-n", help="Benchmark to run (repeatable; default: all)."),
    set_: Optional[List[str]] = SetOpt,
    quick: bool = typer.Option(False, "--quick", help="A small version of every benchmark (minutes, not tens of them)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for bench.json and bench.md (default: "
                                       "runs/bench-<timestamp>); must be empty or absent."),
) -> None:
    """Run the performance benchmarks side by side; write bench.json and bench.md, print the table."""
    import time

    from fedpeft.bench import BENCHMARKS, run_benchmarks, write_results
    from fedpeft.validation import load_config

    unknown = [n for n in name or [] if n not in BENCHMARKS]
    if unknown:
        fail(f"--name {unknown[0]!r} is not a benchmark; choose from: {', '.join(BENCHMARKS)}")
    try:
        load_config(None, set_ or [])  # a bad --set fails here, before anything runs or is written
    except FedPeftError as exc:
        fail(str(exc))
    target = prepare_out(out, Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}")
    selected = list(name or BENCHMARKS)
    try:
        with progress_bar() as progress:
            task = progress.add_task("benchmarks", total=len(selected))
            seen: list[str] = []

            def on_progress(text: str) -> None:
                bench_name = text.split(":", 1)[0]
                if bench_name not in seen:
                    seen.append(bench_name)
                progress.update(task, completed=len(seen) - 1, description=text)

            results = run_benchmarks(selected, set_ or [], quick=quick, progress=on_progress)
            progress.update(task, completed=len(selected), description="benchmarks done")
    except FedPeftError as exc:
        fail(str(exc))
    json_path, md_path = write_results(results, target)
    print(md_path.read_text())
    print(f"written: {json_path} and {md_path}", file=sys.stderr)


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="Sweep TOML: a config plus a \\[sweep] table (see experiments/)."),
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep folder (default: runs/sweeps/<sweep name>); reruns resume."),
    full: bool = typer.Option(False, "--full", help="Apply the sweep's full-size overrides (sweep.full)."),
    shard: str = typer.Option("0/1", "--shard", help="K/N: run every N-th run from K, to share cores between N processes."),
) -> None:
    """Run a grid of federations (strategies x data splits x seeds) and tabulate them."""
    from fedpeft.sweep import load_sweep, run_sweep

    try:
        k, n = (int(x) for x in shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        fail(f"--shard {shard!r} must be K/N with 0 <= K < N, e.g. 0/2")
    try:
        spec, runs, _ = load_sweep(config, full, set_ or [])
    except FedPeftError as exc:
        fail(str(exc))
    target = out or Path("runs") / "sweeps" / f"{spec.get('name', config.stem)}{'-full' if full else ''}"

    with progress_bar() as progress:
        task = progress.add_task("sweep", total=len(runs))

        def on_run(done, total, run, result):
            text = f"{run.strategy} {run.partition} seed {run.seed}"
            if result is not None:
                text += f": accuracy {result['accuracy']:.4f}"
            progress.update(task, completed=done, description=text)

        results = run_sweep(config, target, full, set_ or [], on_run, shard=(k, n))
    if len(results) < len(runs):
        print(f"shard {k}/{n} done; {len(results)} of {len(runs)} runs finished, rerun without --shard for the table")
    else:
        print((target / "table.md").read_text())
    print(f"sweep folder: {target}")


@app.command()
def audit(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Audit folder (default: runs/<timestamp>-audit-<name>); must be empty or absent."),
          sweep: Optional[Path] = typer.Option(None, "--sweep", help="Sweep file (e.g. experiments/audit_sweep.toml): attack success vs epsilon, rank, batch size, with a plot."),
          full: bool = typer.Option(False, "--full", help="With --sweep: the full-size sweep (the file's full_victims and full_values).")) -> None:
    """Audit what a curious server can rebuild from one client's payload; writes audit.json and audit.md."""
    import time

    from fedpeft.validation import load_config

    if full and sweep is None:
        fail("--full needs --sweep FILE")
    try:
        cfg = load_config(config, set_ or [])
        from fedpeft.audit.attacks import build_attacks

        build_attacks(cfg.audit)  # an unknown attack or a bad parameter fails here, before anything is written
        if sweep is not None:
            from fedpeft.audit.sweep import load_sweep

            spec = load_sweep(sweep, full, set_ or [], config)
    except FedPeftError as exc:
        fail(str(exc))
    if sweep is not None:
        _audit_sweep(spec, sweep, set_ or [], prepare_out(out, Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{spec.name}{'-full' if full else ''}"))
        return
    target = prepare_out(out, Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-audit-{cfg.federation.name}")

    from fedpeft.audit.report import AUDIT_MD, write_report
    from fedpeft.audit.runner import run_audit

    try:
        with progress_bar() as progress:
            task = progress.add_task("loading data and model", total=None)

            def on_victim(description: str, done: int, total: int) -> None:
                progress.update(task, description=description, completed=done, total=total)

            result = run_audit(cfg, progress=on_victim)
    except FedPeftError as exc:
        fail(str(exc))
    write_report(result, target)
    print(f"audit folder: {target} (see {target / AUDIT_MD})")


def _audit_sweep(spec, path: Path, overrides: list[str], target: Path) -> None:
    """Run an audit sweep with a progress bar and write its folder."""
    from fedpeft.audit.sweep import SWEEP_MD, budget_line, run_sweep, write_sweep

    try:
        with progress_bar() as progress:
            task = progress.add_task("audit sweep", total=len(spec.points))

            def on_point(done: int, total: int, point) -> None:
                progress.update(task, completed=done, description=f"{point.axis} = {'reference' if point.value is None else point.value}")

            result = run_sweep(spec, overrides, on_point)
            progress.update(task, completed=len(spec.points))
    except FedPeftError as exc:
        fail(str(exc))
    write_sweep(result, target, budget_line(path))
    print(f"audit sweep folder: {target} (see {target / SWEEP_MD})")


@app.command("strategies")
def list_strategies() -> None:
    """List the registered aggregation strategies."""
    import strategies as registry

    for name, summary in registry.describe():
        print(f"{name:12s} {summary}")


@app.command("attacks")
def list_attacks() -> None:
    """List the registered privacy attacks (for audit.attacks): what each recovers, and from what."""
    from fedpeft.audit.attacks import describe_attacks

    for name, line in describe_attacks():
        print(f"{name:20s} {line}")


def main() -> None:
    import click

    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `fedpeft`: help is the answer
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        sys.exit(0)
    except click.UsageError as exc:  # unknown option, missing value: one line, like config errors
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
