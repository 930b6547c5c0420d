"""gesim: theory and simulation of gradient entanglement in preference optimisation.

Importing gesim loads numpy and sympy only; torch and matplotlib load when a module that
needs them is used.
"""

from gesim import dynamics, losses, regimes, symbolic
from gesim.errors import GesimError

__version__ = "0.1.0"
__all__ = ["losses", "symbolic", "dynamics", "regimes", "GesimError", "__version__"]
