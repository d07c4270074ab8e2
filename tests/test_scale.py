"""Simulation memory follows the clients sampled in a round, not the clients registered."""

import gc

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.data import LocalData
from fedge.config import RunConfig
from fedge.simulations.inprocess import FIRST_CLIENT_NODE_ID, InProcessGrid
from fedge.simulations.runner import plan_simulation, simulate

# Digits leaves ~1,257 client samples: 600 iid clients hold 2 or 3 each.
REGISTERED, FRACTION, SAMPLED = 600, 0.02, 12


def _alive(kind: type) -> int:
    gc.collect()
    return sum(type(obj) is kind for obj in gc.get_objects())


def test_no_client_data_or_context_outlives_its_round(tmp_path):
    # In this process (workers=1), where the objects can be counted.
    config = RunConfig(dataset="digits", clients=REGISTERED, fraction=FRACTION, rounds=2,
                       local_epochs=1, partition="iid", patience=5, workers=1)
    plan = plan_simulation(config)
    before = _alive(LocalData), _alive(Context)
    after_each_round = []

    def on_round(record, _best: bool) -> None:
        after_each_round.append((record.num_clients, (_alive(LocalData), _alive(Context))))

    simulate(plan, tmp_path / "run", on_round=on_round)
    assert after_each_round == [(SAMPLED, before), (SAMPLED, before)]


def _counting_app() -> ClientApp:
    """A ClientApp whose nodes count their messages in ``context.state`` when asked to."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen = 1
        if "count" in context.state.config_records:
            seen += int(context.state.config_records["count"]["seen"])
        if msg.content["config"]["keep-state"]:
            context.state.config_records["count"] = ConfigRecord({"seen": seen})
        return Message(RecordDict({"metrics": MetricRecord({"seen": seen})}), reply_to=msg)

    return app


def _send(grid: InProcessGrid, node_id: int, keep_state: bool) -> int:
    content = RecordDict({"config": ConfigRecord({"keep-state": keep_state})})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", node_id, "1")])
    return int(reply.content["metrics"]["seen"])


def test_a_node_keeps_its_context_only_while_its_state_holds_something():
    grid = InProcessGrid(_counting_app(), num_nodes=10_000)
    first, second = FIRST_CLIENT_NODE_ID, FIRST_CLIENT_NODE_ID + 9_999

    assert len(list(grid.get_node_ids())) == 10_000
    assert grid.live_contexts() == 0
    assert [_send(grid, first, keep_state=True) for _ in range(3)] == [1, 2, 3]
    assert [_send(grid, second, keep_state=False) for _ in range(3)] == [1, 1, 1]
    assert grid.live_contexts() == 1
