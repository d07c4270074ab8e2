"""Differential privacy for a run: DP-FedAvg with client-side clipping (McMahan et al., 2018).

Each of the ``m`` clients sampled in a round clips its update to the L2 norm ``C``
(Flower's ``fixedclipping_mod``, which the server asks for in the round's config); the
server averages the clipped updates with equal weights and adds Gaussian noise
calibrated to ``C`` (Flower's ``DifferentialPrivacyClientSideFixedClipping``):

    w ← w + (1/m) Σ_k Δ_k · min(1, C / ‖Δ_k‖₂) + N(0, (σ·C/m)² I),   Δ_k = w_k − w

Adding or removing one client's whole data set moves the clipped mean by at most C/m,
so every round releases the output of a Gaussian mechanism with noise multiplier σ.
Flower's RDP accountant (Google's dp-accounting) composes the rounds and converts the
total to (ε, δ): client-level DP of the whole sequence of global models, and of
everything computed from them without client data (best round, checkpoints, ONNX).

ε takes no credit for sampling only a fraction of the clients (no amplification): it
holds however clients are picked, drop out or rejoin, and needs no population size.
With every client in every round (``fraction = 1``, the default) nothing is lost.

A DP round takes exactly ``m = max(⌊fraction · clients⌋, min_clients)`` clients and is
aggregated only when all ``m`` reply; otherwise it keeps the global model and spends no
ε (fewer updates would need more noise than the ``σ·C/m`` it adds). σ = 0 with a clip
norm clips and averages the same way without noise: no privacy guarantee, a baseline.
"""

import logging

import numpy as np
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fedge.config import PrivacySettings, RunConfig, StrategySettings
from fedge.errors import FedgeError
from fedge.protocol import DP_WEIGHT_KEY

log = logging.getLogger("fedge.server")

# Each client's weight in a DP average: the clients' privacy mod reports 1, so that no
# client moves the mean more than C/m (FedAvg's example counts would let a large client).
# Strategies whose aggregate is FedAvg's mean, the only one the noise is calibrated for.
DP_STRATEGIES = ("fedavg", "fedprox")
# FedAvg samples max(⌊fraction_train · connected⌋, min_train_nodes) clients: with a
# vanishing fraction that is exactly min_train_nodes, however many are connected.
_FIXED_SAMPLE = 1e-9
ACCOUNTANT = "RDP: Flower's RdpAccountant (Google's dp-accounting)"


def privacy_enabled(privacy: PrivacySettings) -> bool:
    """Whether clients clip their updates (with noise or, σ = 0, without)."""
    return privacy.dp_clip_norm is not None


def clients_per_round(strategy: StrategySettings) -> int:
    """``K = max(⌊fraction · clients⌋, min_clients)``: the clients a round samples, as
    FedAvg counts them; a DP round takes exactly these (its ``m``), all of whom must
    reply."""
    return max(int(strategy.fraction * strategy.clients), strategy.min_clients)


def min_round_clients(config: RunConfig) -> int:
    """The fewest connected clients a round can start with."""
    if privacy_enabled(config.privacy):
        return clients_per_round(config.strategy)
    return config.strategy.min_clients


def check_privacy(config: RunConfig) -> None:
    """Differential-privacy settings that cannot work, as one clear error."""
    privacy, strategy, simulation = config.privacy, config.strategy, config.simulation
    if privacy.dp_noise_multiplier > 0 and privacy.dp_clip_norm is None:
        raise FedgeError("dp_noise_multiplier needs dp_clip_norm: the noise is calibrated to "
                         "the norm C that every client's update is clipped to")
    if not privacy_enabled(privacy):
        return
    if strategy.name not in DP_STRATEGIES:
        raise FedgeError(f"differential privacy needs strategy {' or '.join(DP_STRATEGIES)}: "
                         f"its noise is calibrated to a plain mean of clipped updates, which "
                         f"{strategy.name} does not compute")
    if privacy.secagg:
        raise FedgeError("differential privacy and secagg cannot be combined: SecAgg+ rounds "
                         "run Flower's legacy workflow, which neither clips nor adds noise")
    if strategy.min_clients > strategy.clients:
        raise FedgeError(f"a DP round takes exactly max(fraction · clients, min_clients) "
                         f"clients, but min_clients ({strategy.min_clients}) exceeds clients "
                         f"({strategy.clients}); set clients to the number of devices")
    m = clients_per_round(config.strategy)
    if simulation.offline_fraction > 0 and m > strategy.min_clients:
        raise FedgeError(f"a DP round takes exactly {m} clients, but with offline_fraction "
                         f"only min_clients ({strategy.min_clients}) are sure to be online; "
                         f"set min_clients to {m} or lower fraction")


def private_sampling(config: RunConfig) -> dict:
    """Strategy settings that replace the usual sampling in a DP run: exactly ``m``
    clients a round, averaged with equal weights. Empty without DP."""
    if not privacy_enabled(config.privacy):
        return {}
    m = clients_per_round(config.strategy)
    return {"fraction_train": _FIXED_SAMPLE, "min_train_nodes": m, "min_available_nodes": m,
            "weighted_by_key": DP_WEIGHT_KEY}


def with_privacy(strategy: Strategy, config: RunConfig) -> Strategy:
    """``strategy`` (built with :func:`private_sampling`) wrapped in Flower's client-side
    clipping DP strategy and its RDP accountant; unchanged without DP."""
    privacy = config.privacy
    if not privacy_enabled(privacy):
        return strategy
    sigma, m = privacy.dp_noise_multiplier, clients_per_round(config.strategy)
    accountant = None
    if sigma > 0:
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=privacy.dp_delta, population_size=config.strategy.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        # Flower draws the noise from numpy's global generator. Fresh OS entropy: nothing
        # recorded with the run (its seed included) may let anyone predict and subtract it.
        np.random.seed()
    try:
        wrapped = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=sigma, clipping_norm=privacy.dp_clip_norm,
            num_sampled_clients=m, accountant=accountant)
    except ValueError as error:
        raise FedgeError(f"differential privacy cannot wrap this strategy: {error}") from error
    log.info("differential privacy: %d clients a round clip updates to norm %g; noise "
             "σ = %g (std %.4g on the mean)", m, privacy.dp_clip_norm, sigma,
             sigma * privacy.dp_clip_norm / m)
    return wrapped


def _dp_strategy(strategy: Strategy) -> DifferentialPrivacyClientSideFixedClipping | None:
    """The DP wrapper inside ``strategy``'s chain of wrapped strategies, if any."""
    while strategy is not None and not isinstance(
            strategy, DifferentialPrivacyClientSideFixedClipping):
        strategy = getattr(strategy, "strategy", None)
    return strategy


def epsilon_spent(strategy: Strategy) -> float | None:
    """ε spent so far (at the run's δ) by the rounds released; None without noise."""
    dp = _dp_strategy(strategy)
    spent = dp.privacy_spent() if dp is not None else None
    return None if spent is None else spent.epsilon


def privacy_report(strategy: Strategy, clients: int) -> dict | None:
    """The run's privacy settings and guarantee, for metrics.json; None without DP."""
    dp = _dp_strategy(strategy)
    if dp is None:
        return None
    m = dp.num_sampled_clients
    spent = dp.privacy_spent()
    return {
        "mechanism": "DP-FedAvg: client-side clipping, Gaussian noise on the server's mean",
        "noise_multiplier": dp.noise_multiplier,
        "clip_norm": dp.clipping_norm,
        "noise_std": dp.noise_multiplier * dp.clipping_norm / m,
        "clients_per_round": m,
        "clients": clients,
        "sample_rate": m / clients,
        "amplification_by_sampling": False,
        "neighbouring": "add or remove one client's data",
        "accountant": None if spent is None else ACCOUNTANT,
        "delta": None if spent is None else spent.delta,
        "releases": None if spent is None else spent.num_releases,
        "epsilon": None if spent is None else spent.epsilon,
    }
