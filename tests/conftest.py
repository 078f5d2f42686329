"""Keep torch single-threaded in the test process so parallel workers do not oversubscribe the cores."""

import torch

torch.set_num_threads(1)
