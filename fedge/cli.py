"""The ``fedge`` command line. Heavy imports happen inside commands: ``fedge predict``
must run on a device that has onnxruntime but no torch."""

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import click
import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fedge.config import (
    COMMAND_SECTIONS,
    SECTIONS,
    Command,
    Quantize,
    RunConfig,
    default,
    load_config,
    settings_index,
    step_name,
)
from fedge.errors import FedgeError
from fedge.logs import LogFormat, show_fedge_logs
from fedge.models.measures import HEADLINE, headline, test_headline

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _print_error(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever a library said
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


@contextlib.contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    """A command line click cannot parse (``--clients ten``, a missing option) ends as
    any other bad input does: one ``error:`` line naming the option, exit status 2."""
    try:
        yield
    except click.ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `fedge` alone: the help, shown
            raise
        message = _not_taken(error) or error.format_message().rstrip(".")
        _print_error(f"{message[:1].lower()}{message[1:]}")
        raise click.exceptions.Exit(error.exit_code) from None


def _not_taken(error: click.ClickException) -> str | None:
    """``fedge server --attack``: which command takes the setting, rather than only that
    this one does not."""
    if not isinstance(error, click.NoSuchOption) or error.ctx is None:
        return None
    name = error.option_name.removeprefix("--no-").removeprefix("--").replace("-", "_")
    if name not in settings_index():
        return None
    section = settings_index()[name][0]
    takers = [c for c, sections in COMMAND_SECTIONS.items() if section in sections]
    verb = "does" if len(takers) == 1 else "do"
    return (f"{error.option_name} is a setting of [{section}], which fedge "
            f"{error.ctx.info_name} does not take (fedge {' and fedge '.join(takers)} {verb})")


class _Commands(TyperGroup):
    """fedge's commands, whose command-line mistakes are reported in one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(help="Federated edge training: Flower rounds, PyTorch clients, ONNX models.",
                  cls=_Commands, no_args_is_help=True, add_completion=False,
                  suggest_commands=False,  # click suggests already
                  pretty_exceptions_enable=False)


def _friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedgeError as error:
            _print_error(str(error))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return run


def _show_logs(verbose: bool) -> None:
    """Call after Flower is imported: importing it sets up its logger."""
    # Flower logs every round at INFO; fedge prints its own line per round instead.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _round_line(record: Any, total: int, best: bool, task: str, monitor: str,
                unit: str = "round") -> str:
    train = "   n/a" if record.train_loss is None else f"{record.train_loss:6.3f}"
    star = " [green]★ best[/]" if best else ""
    faults = (f"  failed {record.failures:>2}  timed out {record.timeouts:>2}"
              if record.failures or record.timeouts else "")
    simulated = ("" if record.simulated_seconds is None
                 else f"  simulated {record.simulated_seconds:6.1f}s")
    epsilon = "" if record.epsilon is None else f"  ε {record.epsilon:6.2f}"
    return (f"{unit} {record.round:>3}/{total}  train_loss {train}  "
            f"val_loss {record.val_loss:6.3f}  {_measured(task, monitor, record.val_measures)}  "
            f"clients {record.num_clients:>3}{faults}{simulated}{epsilon}  "
            f"{record.seconds:5.2f}s{star}")


def _measured(task: str, monitor: str, found: dict | None) -> str:
    """The task's headline measure, and the monitored one beside it when it differs."""
    found = found or {}
    shown = headline(task, found, "val_")
    name = monitor.removeprefix("val_")
    if name not in ("loss", HEADLINE[task]):
        value = found.get(name)
        shown += f"  {monitor} " + ("  n/a" if value is None else f"{value:6.3f}")
    return shown


Opt = typer.Option
LogFormatOption = Annotated[LogFormat, Opt(help="text, or json: one JSON object a line "
                                                "for a log collector")]
VerboseFlowerOption = Annotated[bool, Opt(
    "--verbose", "-v", help="show Flower's output unfiltered, tracebacks included")]
RecordWireOption = Annotated[Path | None, Opt(
    help="record every message a client sends into this folder (check it with "
         "`fedge audit-wire`)")]


def _check_transport(insecure: bool, tls_file: Path | None, tls_option: str,
                     risk: str) -> None:
    """TLS unless --insecure, which is said out loud."""
    if insecure == (tls_file is not None):
        raise FedgeError(f"give {tls_option} (TLS, the default) or --insecure, not both or "
                         "neither")
    if insecure:
        errors.print(f"[yellow]warning:[/] --insecure: {risk}; use it on loopback only")


SECTION_HELP = {"run": "Run", "data": "Data", "task": "Task and measures", "model": "Model",
                "training": "Local training (sent to clients)", "strategy": "Strategy and rounds",
                "privacy": "Privacy", "simulation": "Simulation",
                "devices": "Devices without Python", "tracking": "Tracking"}


def _option_type(annotation: Any) -> Any:
    """The command-line type of a setting: choices and shapes are text, checked as a
    file's values are."""
    kinds = {t for t in (annotation, *get_args(annotation)) if t is not type(None)}
    for kind in (bool, int, float):
        if kind in kinds:
            return kind | None
    if any(get_origin(t) is list for t in kinds):
        return list[str] | None
    return str | None


def _setting_option(name: str, field: FieldInfo, section: str) -> inspect.Parameter:
    """The option of one setting, from its definition: type, help and default."""
    shown = "" if field.default in (None, []) else f"  \\[default: {field.default}]"
    repeat = " (repeatable)" if get_origin(field.annotation) is list else ""
    option = Opt(f"--{name.replace('_', '-')}", help=f"{field.description}{repeat}{shown}",
                 show_default=False, rich_help_panel=SECTION_HELP[section])
    if field.annotation in (bool, bool | None):
        option = Opt(f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",
                     help=f"{field.description}{shown}", show_default=False,
                     rich_help_panel=SECTION_HELP[section])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[_option_type(field.annotation), option])


def _command_settings(command: Command) -> list[tuple[str, str, FieldInfo]]:
    """(name, section, definition) of every setting ``fedge command`` takes."""
    found = [("seed", "run", RunConfig.model_fields["seed"])]
    for name, (section, field) in settings_index().items():
        if section in COMMAND_SECTIONS[command]:
            found.append((name, section, SECTIONS[section].model_fields[field]))
    return found


def _with_settings(command: Command) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Gives a command one option per setting it takes, grouped in --help by section; the
    command receives those given as ``settings`` (by name)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        settings = _command_settings(command)
        names = {name for name, _, _ in settings}

        @wraps(function)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return function(settings={k: v for k, v in given.items() if v is not None},
                            **kwargs)

        own = [p for p in inspect.signature(function).parameters.values()
               if p.name != "settings"]
        options = [_setting_option(*setting) for setting in
                   ((name, field, section) for name, section, field in settings)]
        run.__signature__ = inspect.Signature(own + options)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in own + options}
        return run

    return decorate


@app.command()
@_friendly_errors
@_with_settings("simulate")
def simulate(
    settings: dict[str, Any],
    config: Annotated[Path | None, Opt("--config", "-c", help="TOML file of run settings "
                                       "(tables as the sections below); options override "
                                       "it")] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="run folder  "
                                                         "\\[default: runs/<timestamp>]")] = None,
    overwrite: Annotated[bool, Opt(help="replace an existing run folder")] = False,
    resume: Annotated[bool, Opt(help="continue the interrupted run in --out after its last "
                                     "completed round")] = False,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="show Flower's logs")] = False,
    record_wire: RecordWireOption = None,
) -> None:
    """Run a federated training of many clients on this machine."""
    if resume and out is None:
        raise FedgeError("--resume needs --out: the run folder to continue")
    status = console.status("loading data, partitioning clients, building the model...")
    status.start()
    import fedge.simulations.runner  # noqa: F401 - imports Flower, whose logger this sets
    from fedge.api import simulate as run_simulation

    _show_logs(verbose)
    total, unit, task = [0], ["round"], [RunConfig().task]
    tracking = [RunConfig().tracking]

    def show_plan(plan: Any) -> None:
        status.stop()
        total[0] = plan.config.strategy.rounds
        unit[0] = step_name(plan.config.strategy)
        task[0] = plan.config.task
        tracking[0] = plan.config.tracking
        _print_plan(plan)

    def show_start(initial: dict) -> None:
        console.print(f"{unit[0]} {0:>3}/{total[0]}  {'starting model':<17}  val_loss "
                      f"{initial['val_loss']:6.3f}  "
                      f"{_measured(task[0].name, task[0].monitor, initial['val_measures'])}",
                      highlight=False)

    def show(record: Any, best: bool) -> None:
        console.print(_round_line(record, total[0], best, task[0].name, task[0].monitor,
                                  unit[0]), highlight=False)

    try:
        result = run_simulation(settings.pop("model", None), config=config, out=out,
                                overwrite=overwrite, resume=resume, on_plan=show_plan,
                                on_start=show_start, on_round=show, record_wire=record_wire,
                                verbose=verbose, **settings)
    finally:
        status.stop()
    monitored = ("validation loss" if task[0].monitor == "val_loss"
                 else task[0].monitor.replace("_", " "))
    stop = (f"stopped early ({monitored} plateaued)" if result.stopped_early
            else f"all {unit[0]}s")
    ran = f"{result.rounds_run} {'rounds' if unit[0] == 'round' else 'evaluations'}"
    console.print(
        f"[bold green]done[/]: {ran}, {stop}; best {unit[0]} "
        f"{result.best_round}: {test_headline(task[0].name, result.test)} "
        f"(loss {result.test_loss:.3f}); ONNX parity {result.onnx_report['max_abs_diff']:.1e}",
        highlight=False)
    if result.privacy:
        console.print(_privacy_line(result.privacy), highlight=False)
    console.print(f"run folder: {result.run_dir}  (metrics.json, checkpoint.pt, best.pt, "
                  "curves.png, model.onnx, onnx_report.json)", highlight=False)
    if tracking[0].track:
        from fedge.server.tracking import tracked_places

        console.print(f"tracked in: {'; '.join(tracked_places(tracking[0], result.run_dir))}",
                      highlight=False)


def _print_plan(plan: Any) -> None:
    from fedge.simulations.attacks import describe_attack
    from fedge.simulations.heterogeneity import describe_devices

    settings, sizes = plan.config, plan.clients.partition_sizes()
    simulation, strategy = settings.simulation, settings.strategy
    console.print(
        f"[bold]fedge simulate[/]: {escape(plan.source)}, model {escape(settings.model.name)}, "
        f"{strategy.clients} clients ({escape(plan.partition)}, {min(sizes)}–{max(sizes)} "
        f"samples each), {strategy.name}, ≤{strategy.rounds} {step_name(strategy)}s, "
        f"backend {simulation.backend}", highlight=False)
    if settings.model.init:
        frozen = f", {len(plan.start.frozen)} entries frozen" if plan.start.frozen else ""
        console.print(f"[bold]starting weights[/]: {escape(settings.model.init)}{frozen}",
                      highlight=False)
    if plan.holdouts:
        console.print(f"[bold]server hold-outs[/]: {escape(plan.holdouts)}", highlight=False)
    if staged := describe_attack(settings):
        console.print(f"[bold red]attack[/]: {staged}", highlight=False)
    if devices := describe_devices(settings):
        console.print(f"[bold]devices[/]: {devices}", highlight=False)
    if settings.simulation.vectorize:
        console.print("[bold]vectorized clients[/]: a round's clients train together, "
                      "batched by torch.func.vmap", highlight=False)
    if settings.privacy.secagg:
        console.print(f"[bold]secure aggregation[/]: SecAgg+, secrets shared among "
                      f"{settings.privacy.secagg_num_shares} clients, "
                      f"{settings.privacy.secagg_threshold} rebuild one", highlight=False)


def _privacy_line(privacy: dict) -> str:
    setting = (f"{privacy['clients_per_round']} clients a round clip updates to norm "
               f"{privacy['clip_norm']:g}")
    if privacy["epsilon"] is None:
        return f"privacy: {setting}; no noise, so no privacy guarantee"
    return (f"privacy: {setting}, noise σ {privacy['noise_multiplier']:g}: "
            f"(ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:g})-DP for each client "
            f"after {privacy['releases']} noised rounds, by {privacy['accountant']}")


@app.command("export")
@_friendly_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt or best.pt of a run")],
    output: Annotated[Path, Opt("--output", "-o", help="ONNX file to write")],
    overwrite: Annotated[bool, Opt(help="replace an existing ONNX file")] = False,
    quantize: Annotated[Quantize | None, Opt(
        help="write an int8 model: int8 (static, calibrated on held-out samples; dynamic "
             "for a Hugging Face model) or int8-dynamic (weights only)")] = None,
    eval_data: Annotated[Path | None, Opt(
        help="labelled held-out samples (CSV, NPZ or image folder) for the int8 vs fp32 "
             "headline measure of the task (accuracy, pr_auc, micro_f1, mae)  \\[default: "
             "agreement with fp32 on the checkpoint's held-out samples]")] = None,
) -> None:
    """Export a checkpoint's global model to ONNX, verified in onnxruntime."""
    from fedge.api import export

    if eval_data is not None and quantize is None:
        raise FedgeError("--eval-data is for comparing an int8 model with its fp32 model; "
                         "give --quantize too")
    report = export(checkpoint, output, overwrite=overwrite, quantize=quantize,
                    eval_data=eval_data)
    if quantize is None:
        console.print(f"wrote {output}: round {report['round']}, opset {report['opset']}, "
                      f"{report['size_bytes']} bytes, max |onnxruntime − torch| "
                      f"{report['max_abs_diff']:.1e} on {report['compared_samples']} held-out "
                      "samples", highlight=False)
        return
    console.print(f"wrote {output}: int8 ({report['method']}) of round {report['round']}",
                  highlight=False)
    console.print(_quantization_table(report))


def _quantization_table(report: dict) -> Any:
    from rich.table import Table

    measure = report["measure"]
    table = Table(title=f"int8 vs fp32 on {report['evaluated_samples']} held-out samples")
    for column in ("model", "size (bytes)", measure, "batch-1 latency (µs)"):
        table.add_column(column, justify="right")
    for name in ("fp32", "int8"):
        row = report[name]
        value = "n/a" if row[measure] is None else f"{row[measure]:.4f}"
        table.add_row(name, str(row["size_bytes"]), value, f"{row['latency_us_batch1']:.1f}")
    if report["agreement"] is None:
        agreeing = f"int8 differs from fp32 by at most {report['max_abs_difference']:.3g}"
    else:
        decision = "set of labels" if report["task"] == "multilabel" else "class"
        agreeing = (f"int8 predicts the fp32 {decision} on {report['agreement']:.1%} of the "
                    "samples")
    table.caption = f"int8/fp32 size {report['size_ratio']:.2f}×; {agreeing}"
    return table


@app.command()
@_friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="an ONNX model exported by fedge")],
    inputs: Annotated[Path, typer.Argument(
        help=".npy array, .npz (its array x), .csv with one sample per row (a header row is "
             "optional), an image (.png, .jpg, .jpeg, .bmp), or a folder of images "
             "(sub-folders included); a text model's: a text in quotes, a .txt file of "
             "one text per line, a .csv file with a text column, or an .npz of strings")],
    ids: Annotated[bool, Opt("--ids", help="print class (label) ids, even when the model "
                                           "names its classes")] = False,
    probabilities: Annotated[bool, Opt(
        "--probabilities", help="print probabilities instead, in full float32 precision: a "
                                "CSV header naming the classes (binary: the positive class; "
                                "multilabel: the labels), then one row per sample")] = False,
    threshold: Annotated[str | None, Opt(
        help="binary, multilabel: the decision threshold instead of the model's own, one "
             "value or one per label separated by commas")] = None,
    id_column: Annotated[str | None, Opt(
        help="a CSV header's column naming each sample: printed before its prediction "
             "(\"ID<TAB>PREDICTION\"), never fed to the model")] = None,
    label_column: Annotated[str, Opt(help="a CSV header's column that holds labels: "
                                          "ignored")] = default("label_column"),
    ignore_columns: Annotated[list[str] | None, Opt(
        "--ignore-column", help="a CSV header's column that is no feature, e.g. a site or a "
                                "timestamp: ignored (repeatable); the label and column:NAME "
                                "partition columns the model was trained with are ignored "
                                "anyway")] = None,
    text_column: Annotated[str, Opt(help="a text model's CSV column holding the texts")
                           ] = default("text_column"),
) -> None:
    """Print the prediction for each input sample (onnxruntime only, no torch): its class
    (name when the model names its classes, else id); multilabel: its labels joined by
    ";" (an empty line: none); regression: its values, comma-separated. For images
    "FILE<TAB>PREDICTION". "-" for a sample that holds NaN or Inf (exit status 1)."""
    import csv
    import sys

    import numpy as np

    from fedge.models.inference import classify, parse_threshold

    cut = None if threshold is None else parse_threshold(threshold)
    given, result = classify(model, inputs, label_column, ignore_columns or (), cut,
                             id_column, text_column)
    keys = given.keys
    if probabilities:
        table = csv.writer(sys.stdout, lineterminator="\n")
        header, rows = _probability_rows(result, ids)
        table.writerow(([keys[0]] if keys else []) + header)
        for row, cells in enumerate(rows):
            table.writerow(([keys[1][row]] if keys else []) + cells)
    else:
        for row, shown in enumerate(_predicted_texts(result, ids)):
            print(f"{keys[1][row]}\t{shown}" if keys else shown)
    invalid = [str(row) for row in np.flatnonzero(~result.predicted) + 1]
    if invalid:
        shown = ", ".join(invalid[:10]) + (", ..." if len(invalid) > 10 else "")
        errors.print(f"[bold red]error:[/] {len(invalid)} of {len(result.predicted)} samples "
                     f"in {inputs} hold NaN, Inf or values beyond float32's range and have "
                     "no prediction (\"-\"): "
                     f"{'sample' if len(invalid) == 1 else 'samples'} {shown}, counting "
                     "from 1", highlight=False)
        raise typer.Exit(1)


def _number_text(value: float) -> str:
    """A float32 in full: the 9 significant digits that read back as the same float32."""
    return format(float(value), ".9g")


def _predicted_texts(result: Any, ids: bool) -> list[str]:
    """Each sample's prediction as ``fedge predict`` prints it: a class, a
    ``;``-joined set of labels, or comma-separated values; "-" for none."""
    names = None if ids else result.class_names
    texts = []
    for row, predicted in enumerate(result.predicted):
        if not predicted:
            texts.append("-")
        elif result.task == "regression":
            texts.append(",".join(_number_text(v) for v in result.scores[row]))
        elif result.task == "multilabel":
            chosen = [k for k, member in enumerate(result.classes[row]) if member == 1]
            texts.append(";".join(names[k] if names else str(k) for k in chosen))
        else:
            label = int(result.classes[row])
            texts.append(names[label] if names else str(label))
    return texts


def _probability_rows(result: Any, ids: bool) -> tuple[list[str], list[list[str]]]:
    """``--probabilities``: the columns' names and one row of probabilities per sample
    ("-" cells where there is no prediction)."""
    if result.task == "regression":
        raise FedgeError("a regression model predicts values, not probabilities: leave out "
                         "--probabilities")
    scores = result.scores.reshape(len(result.scores), -1)
    width = scores.shape[1]
    names = None if ids else result.class_names
    if result.task == "binary":
        header = [names[1] if names else "1"]
    else:
        header = list(names) if names else [str(k) for k in range(width)]
    rows = [[_number_text(p) for p in shares] if predicted else ["-"] * width
            for shares, predicted in zip(scores, result.predicted, strict=True)]
    return header, rows


@app.command()
@_friendly_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="an ONNX model exported by fedge")],
    data: Annotated[Path, typer.Argument(
        help="labelled samples: CSV with a label column, NPZ with x and y, or a folder of "
             "class sub-folders")],
    label_column: Annotated[str | None, Opt(
        help="the CSV's label column (multilabel, regression: columns, comma-separated)  "
             "\\[default: label; multilabel, regression: the model's label or target "
             "names]", show_default=False)] = None,
    threshold: Annotated[str | None, Opt(
        help="binary, multilabel: the decision threshold instead of the model's own, one "
             "value or one per label separated by commas")] = None,
    as_json: Annotated[bool, Opt("--json", help="print the report as one strict JSON "
                                                "object (null for what the data cannot "
                                                "define)")] = False,
    text_column: Annotated[str, Opt(help="a text model's CSV column holding the texts")
                           ] = default("text_column"),
) -> None:
    """Judge a model on labelled samples by its task's measures (onnxruntime only, no
    torch): the scalar measures, per class (label, target), and the confusion matrix."""
    import json

    from fedge.files import strict_json
    from fedge.models.inference import evaluate as run
    from fedge.models.inference import parse_threshold

    cut = None if threshold is None else parse_threshold(threshold)
    result = run(model, data, label_column=label_column, threshold=cut,
                 text_column=text_column)
    if as_json:
        print(json.dumps(strict_json(result), indent=2, allow_nan=False))
        return
    _print_evaluation(result)


def _print_evaluation(result: dict) -> None:
    """The report of ``fedge evaluate``: a line naming what was judged, the scalars, the
    per-class (label, target) table and the confusion matrix."""
    from rich.table import Table

    from fedge.models.measures import SCALARS

    task = result["task"]
    at = f", threshold {result['threshold']:g}" if task == "binary" else ""
    console.print(f"{escape(result['model'])} on {escape(result['data'])}: {task}, "
                  f"{result['samples']} samples{at}", highlight=False)
    width = max(len(name) for name in SCALARS[task])
    for name in SCALARS[task]:
        console.print(f"  {name:<{width}}  {_measure_text(result[name])}", highlight=False)
    key = next((k for k in ("per_class", "per_label", "per_target") if k in result), None)
    if key is not None:
        rows = result[key]
        columns = list(next(iter(rows.values())))
        table = Table(key.split("_")[1], *columns, title=key.replace("_", " "))
        for name, row in rows.items():
            table.add_row(escape(name), *(_measure_text(row[c]) for c in columns))
        console.print(table)
    if "confusion_matrix" in result:
        names = list(result["per_class"])
        matrix = Table("true \\ predicted", *map(escape, names), title="confusion matrix")
        for name, counts in zip(names, result["confusion_matrix"], strict=True):
            matrix.add_row(escape(name), *map(str, counts))
        console.print(matrix)


def _measure_text(value: object) -> str:
    """A measure as the report shows it: counts whole, others to 4 decimals, n/a for
    what the data cannot define."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


@app.command()
@_friendly_errors
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder (its metrics.json)")]
           ) -> None:
    """Each client's last report in a run: examples, training loss, local validation
    measures, and which clients lag (local validation loss over 1.5 × the median's)."""
    from rich.table import Table

    from fedge.server.run_folder import client_report, read_metrics

    metrics = read_metrics(run_dir)
    rows = client_report(metrics)
    if not rows:
        raise FedgeError(f"{run_dir} has no per-client metrics (a run under differential "
                         "privacy keeps none, nor one made before fedge recorded them)")
    measures = [name for name in dict.fromkeys(k for row in rows for k in row)
                if name.startswith("val_")]
    table = Table("client", "round", "examples", "train_loss", *measures, "lags")
    for row in rows:
        table.add_row(row["client"], str(row["round"]), str(row.get("examples", "")),
                      *(_number(row.get(name)) for name in ("train_loss", *measures)),
                      "[red]lags[/]" if row["lags"] else "")
    console.print(table)
    lagging = [row["client"] for row in rows if row["lags"]]
    console.print(f"{len(rows)} clients; lagging: {', '.join(lagging) or 'none'}",
                  highlight=False)


def _number(value: object) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{value:.3f}"


@app.command()
@_friendly_errors
def watch(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (--out of fedge simulate or "
                                                 "fedge server)")],
    refresh: Annotated[float, Opt(help="seconds between looks at metrics.json (> 0)")] = 1.0,
) -> None:
    """Follow a running (or finished) run: its rounds, best round, clients, failures and
    a sparkline of the monitored measure, redrawn as metrics.json changes; off a terminal,
    a line per round. Exits when the run ends: 0 finished, 1 failed."""
    from fedge.watch import watch as follow

    metrics = follow(run_dir, refresh=refresh, console=console)
    if metrics.get("status") == "failed":
        raise typer.Exit(1)


@app.command()
@_friendly_errors
def certs(
    host: Annotated[list[str], Opt("--host", help="name or IP clients dial (repeatable); "
                                                  "localhost and 127.0.0.1 are always added")],
    out: Annotated[Path, Opt("--out", "-o", help="folder for ca.pem, ca.key, server.pem, "
                                                 "server.key")] = Path("certs"),
    days: Annotated[int, Opt(help="validity in days")] = 365,
) -> None:
    """Make a private CA and the server's TLS certificate."""
    from fedge.server.certs import make_certificates

    paths = make_certificates(out, [*host, "localhost", "127.0.0.1"], days)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}\n"
                  f"give {paths['ca_cert']} to every client; keep ca.key offline",
                  highlight=False)


@app.command()
@_friendly_errors
def keys(
    name: Annotated[str, Opt(help="the device's name, used for the file names")] = "node",
    out: Annotated[Path, Opt("--out", "-o", help="folder for NAME.key and NAME.pub")] = Path(
        "keys"),
) -> None:
    """Make a client's key pair for node authentication."""
    from fedge.client.keys import make_node_keys

    private, public = make_node_keys(out, name)
    console.print(f"wrote {private} (stays on the device) and {public} (give it to the "
                  "server operator)", highlight=False)


@app.command()
@_friendly_errors
@_with_settings("server")
def server(
    settings: dict[str, Any],
    val_data: Annotated[Path, Opt(help="held-out samples for validation (CSV, NPZ or image "
                                       "folder)")],
    config: Annotated[Path | None, Opt("--config", "-c", help="TOML run settings, as for "
                                                              "`fedge simulate`: the tables "
                                                              "below ([simulation] is "
                                                              "simulate's)")] = None,
    certs: Annotated[Path | None, Opt(help="folder made by `fedge certs`")] = None,
    authorized_keys: Annotated[list[Path] | None, Opt(
        "--authorized-key", help="a client's public key (repeatable)")] = None,
    test_data: Annotated[Path | None, Opt(help="held-out test samples  "
                                               "\\[default: the validation data]")] = None,
    host: Annotated[str, Opt(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, Opt(help="port for clients and Flower's CLI", min=1,
                             max=65535)] = 9092,
    health_port: Annotated[int | None, Opt(help="gRPC health-check port", min=1,
                                           max=65535)] = None,
    metrics_port: Annotated[int | None, Opt(help="serve Prometheus metrics on this port "
                                                 "(/metrics; needs pip install "
                                                 "'fedge\\[tracking]')", min=1,
                                            max=65535)] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="run folder; an interrupted run in "
                                    "it resumes  \\[default: runs/<timestamp>]")] = None,
    insecure: Annotated[bool, Opt(help="no TLS, no node authentication: loopback tests "
                                       "only")] = False,
    log_format: LogFormatOption = "text",
    verbose: VerboseFlowerOption = False,
) -> None:
    """Serve a federation to clients on other machines (Flower's Deployment Engine)."""
    from fedge.api import new_run_dir
    from fedge.server.deployment import Listener, ServerSettings, serve

    _show_logs(verbose=False)
    show_fedge_logs(log_format)
    _check_transport(insecure, certs, "--certs", "traffic is unencrypted and any client "
                                                 "may join")
    run_config = load_config(config, "server", **settings)
    served = ServerSettings(config=run_config, val_data=val_data,
                            test_data=test_data, run_dir=out or new_run_dir(),
                            log_format=log_format)
    serve(served, Listener(host, port, certs, tuple(authorized_keys or ()), health_port,
                           metrics_port), verbose=verbose)
    console.print(f"run finished: {served.run_dir}", highlight=False)


@app.command()
@_friendly_errors
def client(
    server: Annotated[str, Opt(help="HOST:PORT of the fedge server")],
    data: Annotated[Path, Opt(help="this device's samples: CSV with a label column, NPZ "
                                   "with x and y, or a folder of class sub-folders")],
    ca: Annotated[Path | None, Opt(help="the server's ca.pem (TLS)")] = None,
    key: Annotated[Path | None, Opt(help="this device's private key from `fedge keys`")] = None,
    label_column: Annotated[str, Opt(help="CSV column holding the label (multilabel, "
                                          "regression: one or several, comma-separated)")
                            ] = default("label_column"),
    val_fraction: Annotated[float, Opt(help="share held out for local early "
                                            "stopping")] = default("val_fraction"),
    task: Annotated[str, Opt(help=f"{SECTIONS['task'].model_fields['name'].description}: "
                                  "the federation's task, which decides how this device "
                                  "reads its labels")] = default("task"),
    device: Annotated[str, Opt(help="auto | cpu | cuda | mps")] = default("device"),
    model: Annotated[str | None, Opt(help="this device's copy of the federation's "
                                          "pretrained model, hf:FOLDER (other models come "
                                          "from the server)")] = None,
    text_column: Annotated[str, Opt(help="with a pretrained model: the CSV column holding "
                                         "the texts")] = default("text_column"),
    join_timeout: Annotated[float, Opt(help="seconds to keep trying to join before giving "
                                            "up")] = 600.0,
    insecure: Annotated[bool, Opt(help="no TLS: loopback tests only")] = False,
    track: Annotated[list[str] | None, Opt(help="this device's own tracking of its local "
                                           "training, which stays here: mlflow[:URI] "
                                           "(default: ./mlruns) | tensorboard[:DIR] "
                                           "(default: ./tensorboard) (repeatable)")] = None,
    log_format: LogFormatOption = "text",
    record_wire: RecordWireOption = None,
    verbose: VerboseFlowerOption = False,
) -> None:
    """Join a federation from this device; the data never leaves it. Leaves when the
    server's run has finished (exit status 0)."""
    started = time.monotonic()  # the join timeout counts from here: start-up takes time too
    from fedge.client.deployment import Connection, DeviceData, run_client

    show_fedge_logs(log_format)
    _check_transport(insecure, ca, "--ca", "traffic is unencrypted")
    texts = text_column if model is not None else None
    summary = run_client(Connection(server, ca, key, join_timeout),
                         DeviceData(data, label_column, val_fraction, task=task,
                                    text_column=texts),
                         device, record_wire, verbose, started=started, model=model,
                         track=track or ())
    console.print(f"the federation's run finished ({summary})", highlight=False)


@app.command()
@_friendly_errors
def gateway(
    server: Annotated[str, Opt(help="HOST:PORT of the fedge server")],
    listen: Annotated[str, Opt(help="HOST:PORT devices connect to")] = "0.0.0.0:8443",
    certs: Annotated[Path | None, Opt(help="folder with the gateway's server.pem and "
                                           "server.key for devices' HTTPS (`fedge certs "
                                           "--host GATEWAY-NAME`)")] = None,
    tokens: Annotated[Path | None, Opt(help="folder of the devices' NAME.sha256 files from "
                                            "`fedge tokens`  \\[default: CERTS/tokens]",
                                       show_default=False)] = None,
    ca: Annotated[Path | None, Opt(help="the server's ca.pem (TLS)")] = None,
    key: Annotated[Path | None, Opt(help="this gateway's private key from `fedge keys`")
                   ] = None,
    round_deadline: Annotated[float, Opt(help="seconds a round waits for device "
                                              "results")] = 60.0,
    min_devices: Annotated[int, Opt(help="fewest device results a round needs")] = 1,
    metrics_port: Annotated[int | None, Opt(help="serve Prometheus metrics of the devices "
                                                 "on this port, on --listen's host "
                                                 "(/metrics; needs pip install "
                                                 "'fedge\\[tracking]')", min=1,
                                            max=65535)] = None,
    join_timeout: Annotated[float, Opt(help="seconds to keep trying to join before giving "
                                            "up")] = 600.0,
    insecure: Annotated[bool, Opt(help="no TLS toward the server nor the devices: loopback "
                                       "tests only")] = False,
    log_format: LogFormatOption = "text",
    verbose: VerboseFlowerOption = False,
) -> None:
    """Bring devices that train with ExecuTorch (`fedge-device`) into a federation: one
    node toward the server, the devices' coordinator toward them."""
    started = time.monotonic()
    from fedge.api import run_gateway

    show_fedge_logs(log_format)
    _check_transport(insecure, ca, "--ca", "traffic is unencrypted")
    if insecure == (certs is not None):
        raise FedgeError("give --certs (HTTPS for devices, the default) or --insecure, not "
                         "both or neither")
    summary = run_gateway(server, listen=listen, ca=ca, key=key, certs=certs, tokens=tokens,
                          round_deadline=round_deadline, min_devices=min_devices,
                          join_timeout=join_timeout, verbose=verbose, started=started,
                          metrics_port=metrics_port)
    console.print(f"the federation's run finished ({summary})", highlight=False)


@app.command()
@_friendly_errors
def tokens(
    names: Annotated[list[str], typer.Argument(help="device names")],
    out: Annotated[Path, Opt("--out", "-o", help="folder for NAME.token and NAME.sha256")
                   ] = Path("tokens"),
) -> None:
    """Make devices' access tokens for `fedge gateway`."""
    from fedge.server.device_tokens import make_tokens

    paths = make_tokens(names, out)
    console.print(f"wrote {', '.join(str(p) for p in paths)}: give NAME.token to that device "
                  "only; the gateway reads the .sha256 files (--tokens)", highlight=False)


@app.command("device-data")
@_friendly_errors
def device_data(
    data: Annotated[Path, typer.Argument(help="samples: CSV with a label column, NPZ with x "
                                              "and y, or a folder of class sub-folders")],
    output: Annotated[Path, Opt("--output", "-o", help="the device's data file to write")],
    label_column: Annotated[str, Opt(help="CSV column holding the label")
                            ] = default("label_column"),
    overwrite: Annotated[bool, Opt(help="replace an existing output file")] = False,
) -> None:
    """Write samples as the data file `fedge-device --data` reads."""
    from fedge.client.device_files import write_device_data

    count = write_device_data(data, output, label_column, overwrite)
    console.print(f"wrote {count} samples to {output}", highlight=False)


@app.command("build-device")
@_friendly_errors
def build_device_command(
    out: Annotated[Path, Opt("--out", "-o", help="build folder")] = Path("fedge-device-build"),
    jobs: Annotated[int, Opt(help="parallel compile jobs")] = 2,
) -> None:
    """Build `fedge-device`, the C++ device client (needs pip install 'fedge[edge]',
    CMake and a C++17 compiler)."""
    from fedge.client.device_build import build_device

    binary = build_device(out, jobs)
    console.print(f"built {binary}", highlight=False)


MAX_SHOWN_VIOLATIONS = 20


@app.command("audit-wire")
@_friendly_errors
def audit_wire(
    recording: Annotated[Path, typer.Argument(help="folder written by --record-wire")],
    data: Annotated[Path | None, Opt(help="the client's samples, as given to `fedge client "
                                          "--data`")] = None,
    dataset: Annotated[str | None, Opt(help="or the data set of a `fedge simulate` run: "
                                            "all of its samples")] = None,
    seed: Annotated[int, Opt(help="the simulation's --seed (synthetic data sets depend on "
                                  "it)")] = 0,
    label_column: Annotated[str, Opt(help="CSV column holding the class id")
                            ] = default("label_column"),
) -> None:
    """Check a wire recording: model-shaped arrays and scalar metrics only, no raw samples
    (exit status 1 if not)."""
    if (data is None) == (dataset is None):
        raise FedgeError("give the samples to search for: --data FILE or --dataset NAME, "
                         "not both or neither")
    if not 0 <= seed < 2**32:
        raise FedgeError(f"--seed must lie in 0..2³²−1, as the simulation's did, not {seed}")
    from rich.table import Table

    from fedge.client.wire import audit_recording

    if data is not None:
        from fedge.datafiles import load_labelled_data

        samples = load_labelled_data(data, label_column=label_column).x
    else:
        from fedge.simulations.datasets import load_dataset

        samples = load_dataset(dataset, seed).x
    report = audit_recording(recording, samples)
    summary = Table("recorded", "count", title=f"wire recording {recording}")
    for name, count in (("messages", report.messages), ("nodes", report.nodes),
                        ("rounds", report.rounds), ("arrays", report.arrays),
                        ("metrics", report.metrics), ("error replies", report.error_replies),
                        ("samples searched", report.samples_searched),
                        ("samples skipped (too short or constant)", report.samples_skipped)):
        summary.add_row(name, str(count))
    console.print(summary)
    if report.passed:
        console.print("[bold green]passed[/]: only the model's parameters and scalar metrics "
                      "were sent, and no sample verbatim", highlight=False)
        return
    problems = Table("message", "violation", title="violations")
    for violation in report.violations[:MAX_SHOWN_VIOLATIONS]:
        problems.add_row(violation.message, violation.problem)
    console.print(problems)
    hidden = len(report.violations) - MAX_SHOWN_VIOLATIONS
    more = f" (first {MAX_SHOWN_VIOLATIONS} shown)" if hidden > 0 else ""
    console.print(f"[bold red]failed[/]: {len(report.violations)} violations{more}",
                  highlight=False)
    raise typer.Exit(1)
