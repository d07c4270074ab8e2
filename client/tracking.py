"""A device's own tracking (``fedge client --track``): its local training, epoch by epoch
and round by round, in an MLflow run or TensorBoard folder on the device. Nothing of it
goes to the server: the reply a round sends is the same with or without it."""

from pathlib import Path

from fedge.client.training import OnEpoch, TrainReport
from fedge.config import TrainingSettings
from fedge.tracking import DEFAULT_FLUSH_TIMEOUT, Tracker, check_targets, open_sink, scalars

# Where a device's trackers write unless --track says: beside where `fedge client` runs.
LOCAL_FOLDERS = {"mlflow": Path("mlruns"), "tensorboard": Path("tensorboard")}


class LocalTracking:
    """The trackers of one ``fedge client``: each local epoch as ``local/*`` at the
    device's running epoch count, each round's report as ``round/*`` at the round."""

    def __init__(self, targets: list[str], run_name: str, tags: dict[str, str],
                 flush_timeout: float = DEFAULT_FLUSH_TIMEOUT) -> None:
        self.trackers = [Tracker(open_sink(target, LOCAL_FOLDERS[target.kind]), flush_timeout)
                         for target in check_targets(targets)]
        for tracker in self.trackers:
            tracker.open(run_name, {"fedge.command": "client", **tags})
        self.epochs = 0
        self._settings_logged = False

    def round_started(self, server_round: int, training: TrainingSettings) -> OnEpoch:
        """What ``train_locally`` tells of each epoch of ``server_round``."""
        if not self._settings_logged:  # the server's training settings, as first received
            for tracker in self.trackers:
                tracker.params({f"training.{k}": str(v) for k, v in
                                training.model_dump(mode="json").items()})
            self._settings_logged = True

        def on_epoch(epoch: int, train_loss: float, measured: dict[str, float | None]) -> None:
            self.epochs += 1
            values = scalars({"train_loss": train_loss, "val_loss": measured.get("loss"),
                              **{f"val_{k}": v for k, v in measured.items() if k != "loss"},
                              "round": server_round}, prefix="local/")
            for tracker in self.trackers:
                tracker.metrics(values, self.epochs, f"epoch {self.epochs}")

        return on_epoch

    def round_done(self, server_round: int, report: TrainReport, seconds: float) -> None:
        values = scalars({"train_loss": report.train_loss, "val_loss": report.val_loss,
                          **{f"val_{k}": v for k, v in report.val_measures.items()},
                          "epochs": report.epochs, "best_epoch": report.best_epoch,
                          "train_seconds": seconds}, prefix="round/")
        for tracker in self.trackers:
            tracker.metrics(values, server_round, f"round {server_round}")

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers:
            tracker.finish(status)
            tracker.close()
