"""The keys of every Flower message fedge's server, clients and gateways exchange.

Client and server never import each other, as they run on different machines; both
import this module, so that a key is spelt once. A train message carries the global
model (ArrayRecord ``arrays``) and a ConfigRecord ``config`` of the entries below; its
reply carries the trained entries (``arrays``) and a MetricRecord ``metrics``.
"""

# Records of train messages and their replies.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"

# The train config: which model the federation trains.
MODEL_SPEC = "model-spec"  # the model's spec (JSON: name, input shape, classes)
PROGRAM_KEY = "model-program"  # your own model's program archive (fedge.models.program)
FROZEN_KEY = "frozen"  # the names of the frozen entries (--freeze)
# A run with device programs (fedge.models.edge): the manifest (JSON text) and the two
# ExecuTorch programs, for `fedge gateway` to hand to its devices.
EDGE_MANIFEST_KEY, EDGE_TRAIN_KEY, EDGE_PREDICT_KEY = "edge-manifest", "edge-train", "edge-predict"

# The train config: the round's local training.
SERVER_ROUND = "server-round"
SEED = "seed"  # the run's seed; each node derives its own from it and the round
PROXIMAL_MU = "proximal-mu"  # FedProx's μ, spelt as Flower's FedProx sends it
# The measure the server monitors (--monitor, e.g. val_pr_auc), sent when it is not
# val_loss: a client stops early on it where its validation split defines it.
MONITOR = "monitor"


def training_key(setting: str) -> str:
    """Every setting of the run's training section (fedge.config.TrainingSettings) travels
    in the train config under its name spelt with ``-``: ``local-epochs``, ``batch-size``,
    ``lr``, ``optimizer``, ``local-patience``, ``compress``."""
    return setting.replace("_", "-")


COMPRESS_KEY = training_key("compress")  # the scheme clients compress updates with

# A gateway's task for its devices (client/device/PROTOCOL.md) carries the round's local
# training under the device protocol's own names, which devices in the field read: each
# from the train config's key.
DEVICE_TRAINING = {"epochs": training_key("local_epochs"),
                   "batch_size": training_key("batch_size"), "lr": training_key("lr"),
                   "optimizer": training_key("optimizer"),
                   "patience": training_key("local_patience"),
                   "proximal_mu": PROXIMAL_MU, "seed": SEED}
# For whoever reads the config in a ClientApp that is not fedge's: what it must answer.
EXPECTED_CLIENT_KEY = "expected-client"

# The train config of a SecAgg+ run (fedge.client.secagg): the legacy format sends arrays
# without names, and a client refuses weights SecAgg+ would clip or overflow.
ARRAY_NAMES = "array-names"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
# The entries clients do not send back (frozen, integer), as an .npz archive: the legacy
# format carries the exchanged arrays only, and a client needs the whole model to train.
FIXED_ARRAYS = "fixed-arrays"

# A train reply's metrics.
WEIGHT_KEY = "num-examples"  # the weight Flower's strategies average by
DP_WEIGHT_KEY = "dp-weight"  # a client's weight in a DP average: 1 for every client
DEVICES_KEY = "devices"  # a gateway's reply: how many devices' results it aggregated
# Who sent a reply, for per-client metrics: its partition id in a simulation, else its
# node id. Never averaged.
CLIENT_KEY = "client-key"
# A train reply's record: the compression scheme used and the int8 scales.
COMPRESSION_RECORD = "compression"
# A record in every reply of a node with fedge's trainer behind it: the server does not
# send RUN_FINISHED to nodes that answer without it, as another ClientApp would raise on it.
FEDGE_NODE = "fedge-node"

# The server's last message to every client once its run has finished: a query whose
# config carries a one-line summary of the run.
RUN_FINISHED = "query.run_finished"
SUMMARY_KEY = "summary"
