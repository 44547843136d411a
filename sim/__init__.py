"""The plant simulator: a centrifugal pump and a flexographic packaging line.

Deterministic for a given seed: the same seed and the same steps give the same series.
"""

from sim.faults import PUMP_FAULTS, Fault
from sim.flexo import FlexoLine
from sim.pump import Pump

PROFILES = {"pump": Pump, "flexo_line": FlexoLine}


def make(profile: str, seed: int = 0, **options):
    """Build the simulated machine for a profile name (`pump` or `flexo_line`)."""
    return PROFILES[profile](seed=seed, **options)


__all__ = ["PROFILES", "PUMP_FAULTS", "Fault", "FlexoLine", "Pump", "make"]
