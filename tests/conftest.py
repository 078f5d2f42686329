"""Shared fixtures: keep torch single-threaded in the test process so parallel workers do not oversubscribe."""

import torch

torch.set_num_threads(1)
