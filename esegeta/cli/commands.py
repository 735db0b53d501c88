"""The ``esegeta`` command line. Heavy imports happen inside the commands, so
``esegeta --help`` starts fast.

Exit codes: 0 all requested methods succeeded; 1 the run finished with failures; 2 the
config or something it names is invalid (message on stderr, no traceback without --debug).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # esegeta/cli/commands.py: the checkout holding configs/
DEMO_CONFIG = REPO_ROOT / "configs" / "retina.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esegeta", description="Explain PyTorch classification and segmentation "
                                     "models with many attribution methods, from one JSON config.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a config: every method on every input")
    run.add_argument("config", type=Path)
    run.add_argument("--output", type=Path, help="output folder (default: the config's output.dir)")
    run.add_argument("--device", help="'cpu', 'cuda:N' or 'auto' (overrides runtime.devices)")
    run.add_argument("--only", nargs="+", metavar="ID_OR_LABEL", help="run only these methods")
    run.add_argument("--resume", action="store_true", help="keep the results of an earlier run in the output "
                     "folder that are complete and made with the same settings; compute the rest")
    run.add_argument("--debug", action="store_true", help="debug logging and tracebacks")

    validate = sub.add_parser("validate", help="check a config, its files, model, layers and parameters; run nothing")
    validate.add_argument("config", type=Path)
    validate.add_argument("--output", type=Path, help="the output folder run would use (default: the config's "
                          "output.dir); checked, not created")
    validate.add_argument("--debug", action="store_true")

    check = sub.add_parser("check", help="pre-flight: one forward pass; which methods will work and why not")
    check.add_argument("config", type=Path)
    check.add_argument("--device", help="'cpu', 'cuda:N' or 'auto' (overrides runtime.devices)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--debug", action="store_true")

    methods = sub.add_parser("methods", help="list every method: library, kind, layer, 2D/3D, availability")
    methods.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("schema", help="print the config's JSON Schema")

    evaluate = sub.add_parser("evaluate", help="score a finished run's saved attributions with the config's "
                              "evaluation metrics and rank the methods (recomputes no attribution)")
    evaluate.add_argument("config", type=Path)
    evaluate.add_argument("--output", type=Path, help="the run's output folder (default: the config's output.dir)")
    evaluate.add_argument("--device", help="'cpu', 'cuda:N' or 'auto' (overrides runtime.devices)")
    evaluate.add_argument("--debug", action="store_true")

    metrics = sub.add_parser("metrics", help="list every evaluation metric: group, paper, forward passes per input")
    metrics.add_argument("--shape", type=int, nargs="+", default=[3, 224, 224], metavar="N",
                         help="input shape (C, *spatial) the forward passes are counted for (default: 3 224 224)")
    metrics.add_argument("--json", action="store_true", help="machine-readable output")

    report = sub.add_parser("report", help="write report.html of a finished run again from its folder (or put a "
                            "later evaluation into it)")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.add_argument("--rebuild", action="store_true", help="rebuild the whole page from the saved files even if "
                        "a report exists (frozen-mask outlines are not saved, so they are left out)")
    report.add_argument("--debug", action="store_true")

    explore = sub.add_parser("explore", help="write explorer.html of a finished run: UMAP of its inputs and maps")
    explore.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    explore.add_argument("--output", type=Path, help="the page's path (default: RUN_DIR/explorer.html)")
    explore.add_argument("--seed", type=int, default=0, help="UMAP's seed (default 0)")
    explore.add_argument("--debug", action="store_true")

    convert = sub.add_parser("convert-torchesegeta", help="write an esegeta config from a TorchEsegeta config "
                             "(docs/torchesegeta.md); the model and inputs, set in Python there, are arguments")
    convert.add_argument("config", type=Path, help="the TorchEsegeta JSON config")
    convert.add_argument("-o", "--output", type=Path, required=True, help="the esegeta config to write")
    convert.add_argument("--model-factory", help="'file.py:callable' or 'module:callable' building the model")
    convert.add_argument("--weights", help="state dict file (or TorchScript file without --model-factory)")
    convert.add_argument("--inputs", nargs="+", required=True, metavar="PATH", help="files, folders or globs to explain")
    convert.add_argument("--wrapper", help="segmentation: 'threshold_based' (the ancestor's default) or 'multi_class', "
                         "an esegeta wrapper name, or a JSON object such as '{\"name\": \"threshold\", \"threshold\": 0.5}'")
    convert.add_argument("--target", help="class index or 'predicted' (default: 1, the foreground, with the threshold "
                         "wrapper; else 'predicted')")
    convert.add_argument("--output-dir", help="results folder (default: the ancestor's output_path/model_dataset_run)")
    convert.add_argument("--normalize", choices=["none", "zscore", "minmax"], help="inputs.normalize")
    convert.add_argument("--layer-map", action="append", default=[], metavar="OLD=NEW",
                         help="rename an ancestor layer to a layer of this model (repeatable)")
    convert.add_argument("--keep-devices", action="store_true", help="keep each method's device_id as its device")
    convert.add_argument("--debug", action="store_true")

    demo = sub.add_parser("demo", help="explain the bundled 2D vessel-segmentation sample with several methods")
    demo.add_argument("--output", type=Path, default=Path("results/demo"), help="output folder (default: results/demo)")
    demo.add_argument("--debug", action="store_true")
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """Logs to stderr through tqdm, so messages and the progress bar do not garble each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def _setup_logging(debug: bool) -> None:
    log = logging.getLogger("esegeta")
    for old in [h for h in log.handlers if isinstance(h, _ConsoleHandler)]:
        log.removeHandler(old)
    handler = _ConsoleHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if debug else "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def _cmd_methods(args) -> int:
    from esegeta.spec.registry import all_methods

    rows = [spec.row() for spec in all_methods().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["id"]) for r in rows) + 1
    print(f"{'id':{width}} {'kind':12} {'layer':6} {'dims':6} {'models':15} {'amp':10} available")
    for r in rows:
        dims = "/".join(f"{d}D" for d in r["dims"])
        models = "/".join({"classification": "classifier", "segmentation": "seg"}[t] for t in r["tasks"])
        amp = "/".join(p for p in ("bf16", "fp16") if r["amp"][p]["safe"]) or "fp32 only"
        print(f"{r['id']:{width}} {r['kind']:12} {_layer_column(r):6} {dims:6} {models:15} {amp:10} "
              f"{'yes' if r['available'] else 'no: ' + r['reason']}")
    print(f"{len(rows)} methods, {sum(r['available'] for r in rows)} available; amp: the reduced precisions a method "
          "was measured safe in (esegeta methods --json: amp, with the figures and reasons)")
    return 0


def _layer_column(row: dict) -> str:
    """``yes``: one layer; ``list``: a list of layers to fuse (``N+``: at least N); ``-``: none."""
    if not row["needs_layer"]:
        return "-"
    n = row["fuses_layers"]
    return "yes" if not n else "list" if n == 1 else f"{n}+"


def _cmd_schema(args) -> int:
    from esegeta.spec.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_validate(args) -> int:
    from esegeta.run.runner import Pipeline

    v = Pipeline(args.config, output_dir=args.output).validate()
    print(f"{args.config}: valid: {len(v.inputs)} input(s), {len(v.entries)} method(s), model "
          f"{type(v.model).__name__} on {v.device}")
    for line in v.ready.summary():
        print(f"  prepared copy: {line}")
    if len(v.ready.summary()) < len(v.ready.changes):
        print("  (each change: `esegeta check`, or manifest.json's prepared_model after a run)")
    return 0


@contextmanager
def _stdout_to_stderr():
    """What the user's code prints (``print`` or a C library writing to file descriptor 1) goes to
    stderr, so that a command's machine-readable stdout (``check --json``) stays parseable."""
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptors to move (an embedded interpreter): Python's print only
        saved = None
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _cmd_check(args) -> int:
    from esegeta.run.check import check

    with _stdout_to_stderr() if args.json else nullcontext():
        report = check(args.config, device=args.device)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return report.exit_code


def _run(pipeline) -> int:
    result = pipeline.run()
    failed = [r for r in result.runs if r["status"] != "ok"]
    shown = " and ".join(str(result.output_dir / f) for f in ("report.html", "overview.png") if (result.output_dir / f).is_file())
    print(f"{len(result.runs) - len(failed)}/{len(result.runs)} ok; results in {result.output_dir}"
          + (f"; open {shown}" if shown else ""), file=sys.stderr)
    if result.error:
        print(f"esegeta: {result.error}", file=sys.stderr)
    return result.exit_code


def _cmd_run(args) -> int:
    from esegeta.run.runner import Pipeline

    return _run(Pipeline(args.config, output_dir=args.output, device=args.device, only=args.only,
                         resume=args.resume))


def _cmd_demo(args) -> int:
    from esegeta.errors import ConfigError
    from esegeta.run.runner import Pipeline

    if not DEMO_CONFIG.is_file():
        raise ConfigError("demo", f"{DEMO_CONFIG} is missing: the demo needs the repository checkout "
                                  "(pip install -e . from a clone)")
    return _run(Pipeline(DEMO_CONFIG, output_dir=args.output))


def _cmd_evaluate(args) -> int:
    from esegeta.run.runner import evaluate_run

    section = evaluate_run(args.config, output_dir=args.output, device=args.device)
    print((Path(section["output_dir"]) / section["files"]["table"]).read_text(encoding="utf-8"))
    print(f"values, ranking and curves in {section['output_dir']}", file=sys.stderr)
    errors = [r for r in section["values"] if r.get("error")]
    return 1 if errors else 0


def _cmd_metrics(args) -> int:
    from esegeta.evaluation.catalogue import metrics_command

    return metrics_command(args)

def _cmd_report(args) -> int:
    from esegeta.show import report

    path = None if args.rebuild else report.update_evaluation(args.run_dir)
    path = path or report.write_report(args.run_dir)
    print(f"report: {path}", file=sys.stderr)
    return 0


def _cmd_explore(args) -> int:
    from esegeta.show import explorer

    path = explorer.write(args.run_dir, args.output, seed=args.seed)
    print(f"explorer: {path}", file=sys.stderr)
    return 0


def _cmd_convert_torchesegeta(args) -> int:
    from esegeta.errors import ConfigError
    from esegeta.run.runner import Pipeline
    from esegeta.cli.torchesegeta import Arguments, convert, summary, write

    layer_map = {}
    for item in args.layer_map:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ConfigError("--layer-map", f"{item!r}: write OLD=NEW")
        layer_map[old] = new
    target = None if args.target is None else (int(args.target) if args.target.isdigit() else args.target)
    result = convert(args.config, Arguments(
        inputs=args.inputs, model_factory=args.model_factory, weights=args.weights, wrapper=args.wrapper, target=target,
        output_dir=args.output_dir, normalize=args.normalize, keep_devices=args.keep_devices, layer_map=layer_map,
        config_dir=args.output.resolve().parent))
    print(f"{args.config}: {result.mapped} entries mapped, {result.unmapped} not mapped; "
          f"{len(result.notes)} keys or entries not mapped (kept under '_comment'):", file=sys.stderr)
    for line in summary(result.notes):
        print(f"  {line}", file=sys.stderr)
    write(result, args.output)
    try:
        v = Pipeline(args.output).validate()
    except ConfigError as exc:
        raise ConfigError(exc.path, f"{exc.message}\n(wrote {args.output}, which does not validate: fix it there, or "
                                    "the arguments, and convert again)") from None
    print(f"wrote {args.output}: valid: {len(v.inputs)} input(s), {len(v.entries)} enabled method(s) of "
          f"{len(result.config['methods'])}")
    return 0


COMMANDS = {"run": _cmd_run, "evaluate": _cmd_evaluate, "metrics": _cmd_metrics,
            "validate": _cmd_validate, "methods": _cmd_methods, "schema": _cmd_schema,
            "demo": _cmd_demo, "check": _cmd_check, "report": _cmd_report, "explore": _cmd_explore,
            "convert-torchesegeta": _cmd_convert_torchesegeta}


@contextmanager
def _signals():
    """SIGINT and SIGTERM raise :class:`esegeta.errors.Interrupted` in the main thread (once: a signal
    that follows while the run stops is ignored), so a run stops cleanly and exits 130 or 143; the
    process's own handlers are put back afterwards. Outside the main thread nothing changes."""
    from esegeta.errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from esegeta.version import __version__

        print(__version__)
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    debug = getattr(args, "debug", False)
    # Upstream progress bars (LIME, SHAP, grad-cam's ScoreCAM) would garble the console: tqdm
    # reads TQDM_* defaults when first imported, so this silences every bar that does not set
    # `disable` itself; esegeta's own bar passes disable=None and stays. The user's setting wins.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command in ("run", "validate", "demo", "check", "evaluate", "report", "explore", "convert-torchesegeta"):
        _setup_logging(debug)
    from esegeta.compat import ensure_torchvision_importable
    from esegeta.errors import EsegetaError

    ensure_torchvision_importable()  # before any user code: its torchvision imports on CPU-only torch
    try:
        with _signals():
            return COMMANDS[args.command](args)
    except EsegetaError as exc:
        if debug:
            raise
        print(f"esegeta: invalid: {exc}" if "\n" not in str(exc) else f"esegeta: invalid config:\n{exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"esegeta: interrupted ({signal.Signals(signum).name}); finished results are kept: "
              "`esegeta run --resume` goes on", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `esegeta methods | head`: the reader left; Python's documented remedy
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


#: Commands that write nothing: their process may end without Python's teardown (see :func:`console`).
READ_ONLY = frozenset({"validate", "check", "methods", "schema", "metrics"})
#: Exit codes after SIGINT and SIGTERM.
INTERRUPTED = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM})


def console() -> None:
    """The ``esegeta`` program: :func:`main`, then the process exit.

    Once torch is imported, Python's own teardown of the interpreter (freeing every module's
    objects) takes about 0.45 s on these machines, a quarter of ``esegeta validate``'s time. A
    read-only command has nothing to tear down: after it returns, the exit handlers run, the
    logs and the standard streams are flushed, and the process ends at once (``os._exit``).
    Every other command exits the usual way."""
    argv = sys.argv[1:]
    code = main(argv)
    # Read-only, or interrupted: a job thread stopped mid-way in a C call may still hold torch's
    # native threads, and the interpreter's teardown would then abort (SIGABRT) instead of exiting.
    if (argv[:1] and argv[0] in READ_ONLY) or code in INTERRUPTED:
        import atexit

        atexit._run_exitfuncs()  # what the interpreter would run (logging.shutdown is one of them)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that left (`| head`), or a closed stream
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
