"""The DIFS-P2P network simulator: thousands of real DHT peers on one machine.

``python -m sim SCENARIO [--seed N] [--peers N] [--out DIR]``. See :mod:`sim.world` for
what a run does, :mod:`sim.mode` for how a mode (:mod:`sim.modelled`, :mod:`sim.fullpeers`)
carries it out on the peers, :mod:`sim.scenario` for the scenario format and
:mod:`sim.models` for the network, churn and size models. ``sim`` imports ``difs_p2p``;
never the other way round (docs/ARCHITECTURE.md shows the simulator's layers).
"""

from __future__ import annotations
