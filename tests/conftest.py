"""Suite-wide settings: one CPU thread per test process.

The models under test are tiny; with several threads each small op pays thread start-up and, on a
2-core CI box, contention, which made the suite several times slower.
"""

import torch

torch.set_num_threads(1)
