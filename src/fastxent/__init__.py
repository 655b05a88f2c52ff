"""fastxent: fast, exact CPU cross entropy and its relatives.

The public functions: cross_entropy, cross_entropy_with_grad, kl_div,
kl_div_with_grad, binary_cross_entropy, binary_cross_entropy_with_grad,
logsumexp, log_softmax, softmax, entropy, the thread controls and
show_config; their contract is docs/API.md. ``fastxent.reference`` holds the
plain NumPy (float64) twin of every function.
"""
import warnings as _warnings
from importlib import metadata as _metadata

from . import _api, _core, _shard, reference
from ._api import (
    binary_cross_entropy,
    binary_cross_entropy_with_grad,
    cross_entropy,
    cross_entropy_with_grad,
    entropy,
    get_num_threads,
    kl_div,
    kl_div_with_grad,
    log_softmax,
    logsumexp,
    set_num_threads,
    softmax,
)
from ._head import linear_cross_entropy, linear_cross_entropy_with_grad
from ._jsd import jsd, jsd_with_grad
from .reference import CrossEntropyStats
from ._shard import (
    ShardGradParts,
    ShardStats,
    combine_shard_stats,
    rescale_shard_stats,
    shard_grad,
    shard_loss,
    shard_stats,
)

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("fastxent")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [*_api.__all__, *_shard.__all__, "show_config", "__version__"]
__all__ += ["linear_cross_entropy", "linear_cross_entropy_with_grad", "jsd", "jsd_with_grad",
            "CrossEntropyStats"]

if _core.init_status() != 0:
    import os as _os

    _warnings.warn(
        f"FASTXENT_ISA={_os.environ.get('FASTXENT_ISA')!r} is not available on this machine "
        f"(available: {', '.join(_core.available_isas())}); using {_core.get_isa()!r}",
        RuntimeWarning,
        stacklevel=2,
    )


def show_config(print_=True):
    """Print and return the build and run-time configuration.

    The version, the instruction set in use and those this CPU can run,
    whether the build has OpenMP (without it every call runs on one thread)
    and the thread count a call uses by default.

    >>> config = fastxent.show_config(print_=False)
    >>> config["version"] == fastxent.__version__
    True
    >>> config["isa"] in config["isas_available"]
    True
    """
    config = {
        "version": __version__,
        "isa": _core.get_isa(),
        "isas_available": _core.available_isas(),
        "openmp": _core.openmp_enabled(),
        "num_threads": get_num_threads(),
    }
    if print_:
        print(f"fastxent {config['version']}")
        print(f"  instruction set : {config['isa']} (available: {', '.join(config['isas_available'])}; "
              "override with FASTXENT_ISA)")
        print(f"  OpenMP          : {'on' if config['openmp'] else 'OFF (serial build)'}")
        print(f"  threads         : {config['num_threads']}")
    return config
