"""Test-session settings.

The test models are tiny, so intra-op threads only add synchronisation (and, on a loaded
2-core machine, spin-waiting that made steps 5-10x slower): run the suite single-threaded.
"""

import torch

torch.set_num_threads(1)
