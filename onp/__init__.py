"""onp: remove backdoors from trained CNNs by learned neuron pruning.

Sub-packages:

* :mod:`onp.data`: datasets, the defender's splits and augmentation;
* :mod:`onp.models`: the CNN registry shared by the env, the agents and every baseline;
* :mod:`onp.attacks`: backdoor attacks whose triggers are deterministic functions of a batch;
* :mod:`onp.metrics`: ACC, ASR, RA and DER;
* :mod:`onp.zoo`: trains and caches backdoored models (``python -m onp.backdoor``).
"""

__version__ = "0.1.0"
