"""The ``fedge`` command line. Heavy imports happen inside commands: ``fedge predict``
must run on a device that has onnxruntime but no torch."""

import logging
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedge.config import RunConfig, load_config
from fedge.errors import FedgeError
from fedge.logs import LogFormat, show_fedge_logs

app = typer.Typer(help="Federated edge training: Flower rounds, PyTorch clients, ONNX models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedgeError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False)
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


def _round_line(record: Any, total: int, best: bool) -> str:
    train = "   n/a" if record.train_loss is None else f"{record.train_loss:6.3f}"
    star = " [green]★ best[/]" if best else ""
    return (f"round {record.round:>3}/{total}  train_loss {train}  "
            f"val_loss {record.val_loss:6.3f}  val_acc {record.val_accuracy:6.3f}  "
            f"clients {record.num_clients:>3}  {record.seconds:5.2f}s{star}")


Opt = typer.Option
LogFormatOption = Annotated[LogFormat, Opt(help="text, or json: one JSON object a line "
                                                "for a log collector")]


def _new_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_transport(insecure: bool, tls_file: Path | None, tls_option: str,
                     risk: str) -> None:
    """TLS unless --insecure, which is said out loud."""
    if insecure == (tls_file is not None):
        raise FedgeError(f"give {tls_option} (TLS, the default) or --insecure, not both or "
                         "neither")
    if insecure:
        errors.print(f"[yellow]warning:[/] --insecure: {risk}; use it on loopback only")


def _setting(name: str) -> Any:
    """A command-line option documented, and defaulted, by the RunConfig field ``name``."""
    field = RunConfig.model_fields[name]
    shown = "" if field.default is None else f"  \\[default: {field.default}]"
    return Opt(help=f"{field.description}{shown}", show_default=False)


@app.command()
@_friendly_errors
def simulate(
    config: Annotated[Path | None, Opt("--config", "-c", help="TOML file of run settings "
                                       "(keys as the options below); options override it")] = None,
    dataset: Annotated[str | None, _setting("dataset")] = None,
    model: Annotated[str | None, _setting("model")] = None,
    clients: Annotated[int | None, _setting("clients")] = None,
    rounds: Annotated[int | None, _setting("rounds")] = None,
    fraction: Annotated[float | None, _setting("fraction")] = None,
    min_clients: Annotated[int | None, _setting("min_clients")] = None,
    strategy: Annotated[str | None, _setting("strategy")] = None,
    partition: Annotated[str | None, _setting("partition")] = None,
    local_epochs: Annotated[int | None, _setting("local_epochs")] = None,
    batch_size: Annotated[int | None, _setting("batch_size")] = None,
    lr: Annotated[float | None, _setting("lr")] = None,
    optimizer: Annotated[str | None, _setting("optimizer")] = None,
    dropout: Annotated[float | None, _setting("dropout")] = None,
    patience: Annotated[int | None, _setting("patience")] = None,
    min_delta: Annotated[float | None, _setting("min_delta")] = None,
    local_patience: Annotated[int | None, _setting("local_patience")] = None,
    proximal_mu: Annotated[float | None, _setting("proximal_mu")] = None,
    server_lr: Annotated[float | None, _setting("server_lr")] = None,
    seed: Annotated[int | None, _setting("seed")] = None,
    backend: Annotated[str | None, _setting("backend")] = None,
    device: Annotated[str | None, _setting("device")] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="run folder  "
                                                         "\\[default: runs/<timestamp>]")] = None,
    overwrite: Annotated[bool, Opt(help="replace an existing run folder")] = False,
    resume: Annotated[bool, Opt(help="continue the interrupted run in --out after its last "
                                     "completed round")] = False,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="show Flower's logs")] = False,
) -> None:
    """Run a federated training of many clients on this machine."""
    settings = load_config(
        config, dataset=dataset, model=model, clients=clients, rounds=rounds,
        fraction=fraction, min_clients=min_clients, strategy=strategy, partition=partition,
        local_epochs=local_epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        dropout=dropout, patience=patience, min_delta=min_delta, local_patience=local_patience,
        proximal_mu=proximal_mu, server_lr=server_lr, seed=seed, backend=backend,
        device=device,
    )
    with console.status("loading data and partitioning clients..."):
        from fedge.simulations.runner import plan_simulation, simulate

        _show_logs(verbose)
        plan = plan_simulation(settings)
    settings = plan.config
    if resume and out is None:
        raise FedgeError("--resume needs --out: the run folder to continue")
    run_dir = out or _new_run_dir()
    sizes = plan.clients.partition_sizes()
    kind = "SYNTHETIC data" if plan.synthetic else "real data"
    console.print(
        f"[bold]fedge simulate[/]: {settings.dataset} ({kind}), model {settings.model}, "
        f"{settings.clients} clients ({settings.partition}, {min(sizes)}–{max(sizes)} samples "
        f"each), {settings.strategy}, ≤{settings.rounds} rounds, backend {settings.backend}",
        highlight=False)

    def show(record: Any, best: bool) -> None:
        console.print(_round_line(record, settings.rounds, best), highlight=False)

    outcome = simulate(plan, run_dir, overwrite=overwrite, on_round=show, resume=resume)
    stop = "stopped early (validation loss plateaued)" if outcome.stopped_early else "all rounds"
    console.print(
        f"[bold green]done[/]: {outcome.rounds_run} rounds, {stop}; best round "
        f"{outcome.best_round}: test accuracy {outcome.test_accuracy:.3f} "
        f"(loss {outcome.test_loss:.3f}); ONNX parity {outcome.onnx_report['max_abs_diff']:.1e}",
        highlight=False)
    console.print(f"run folder: {outcome.run_dir}  (metrics.json, checkpoint.pt, best.pt, "
                  "curves.png, model.onnx, onnx_report.json)", highlight=False)


@app.command("export")
@_friendly_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt or best.pt of a run")],
    output: Annotated[Path, Opt("--output", "-o", help="ONNX file to write")],
    overwrite: Annotated[bool, Opt(help="replace an existing ONNX file")] = False,
) -> None:
    """Export a checkpoint's global model to ONNX, verified in onnxruntime."""
    if output.exists() and not overwrite:
        raise FedgeError(f"{output} already exists; pass --overwrite to replace it")
    from fedge.models.export import export_onnx
    from fedge.server.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint)
    report = export_onnx(saved.model(), saved.model_spec, saved.reference_inputs.numpy(), output)
    console.print(f"wrote {output}: round {saved.round}, opset {report['opset']}, "
                  f"{report['size_bytes']} bytes, max |onnxruntime − torch| "
                  f"{report['max_abs_diff']:.1e} on {report['compared_samples']} held-out "
                  "samples", highlight=False)


@app.command()
@_friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="an ONNX model exported by fedge")],
    inputs: Annotated[Path, typer.Argument(help=".npy array or .csv with one sample per row")],
) -> None:
    """Print the predicted class of each input sample (onnxruntime only, no torch)."""
    from fedge.models.inference import load_inputs
    from fedge.models.inference import predict as predict_classes

    for label in predict_classes(model, load_inputs(inputs)):
        print(int(label))


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
def server(
    val_data: Annotated[Path, Opt(help="held-out samples for validation (CSV, NPZ or image "
                                       "folder)")],
    config: Annotated[Path | None, Opt("--config", "-c", help="TOML run settings, as for "
                                                              "`fedge simulate`")] = None,
    certs: Annotated[Path | None, Opt(help="folder made by `fedge certs`")] = None,
    authorized_keys: Annotated[list[Path] | None, Opt(
        "--authorized-key", help="a client's public key (repeatable)")] = None,
    test_data: Annotated[Path | None, Opt(help="held-out test samples  "
                                               "\\[default: the validation data]")] = None,
    host: Annotated[str, Opt(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, Opt(help="port for clients and Flower's CLI")] = 9092,
    health_port: Annotated[int | None, Opt(help="gRPC health-check port")] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="run folder; an interrupted run in "
                                    "it resumes  \\[default: runs/<timestamp>]")] = None,
    insecure: Annotated[bool, Opt(help="no TLS, no node authentication: loopback tests "
                                       "only")] = False,
    log_format: LogFormatOption = "text",
) -> None:
    """Serve a federation to clients on other machines (Flower's Deployment Engine)."""
    from fedge.server.deployment import Listener, ServerSettings, serve

    _show_logs(verbose=False)
    show_fedge_logs(log_format)
    _check_transport(insecure, certs, "--certs", "traffic is unencrypted and any client "
                                                 "may join")
    settings = ServerSettings(config=load_config(config), val_data=val_data,
                              test_data=test_data, run_dir=out or _new_run_dir(),
                              log_format=log_format)
    serve(settings, Listener(host, port, certs, tuple(authorized_keys or ()), health_port))
    console.print(f"run finished: {settings.run_dir}", highlight=False)


@app.command()
@_friendly_errors
def client(
    server: Annotated[str, Opt(help="HOST:PORT of the fedge server")],
    data: Annotated[Path, Opt(help="this device's samples: CSV with a label column, NPZ "
                                   "with x and y, or a folder of class sub-folders")],
    ca: Annotated[Path | None, Opt(help="the server's ca.pem (TLS)")] = None,
    key: Annotated[Path | None, Opt(help="this device's private key from `fedge keys`")] = None,
    label_column: Annotated[str, Opt(help="CSV column holding the class id")] = "label",
    val_fraction: Annotated[float, Opt(help="share held out for local early "
                                            "stopping")] = 0.2,
    device: Annotated[str, Opt(help="auto | cpu | cuda | mps")] = "auto",
    join_timeout: Annotated[float, Opt(help="seconds to keep trying to join before giving "
                                            "up")] = 600.0,
    insecure: Annotated[bool, Opt(help="no TLS: loopback tests only")] = False,
    log_format: LogFormatOption = "text",
) -> None:
    """Join a federation from this device; the data never leaves it."""
    from fedge.client.deployment import DeviceData, run_client

    show_fedge_logs(log_format)
    _check_transport(insecure, ca, "--ca", "traffic is unencrypted")
    run_client(server, DeviceData(data, label_column, val_fraction), ca, key, device,
               join_timeout)
