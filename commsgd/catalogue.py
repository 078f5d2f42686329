"""What `commsgd --help` and `commsgd list` name, readable without importing torch.

The registry (`commsgd.algorithms.REGISTRY`) and the task tables (`commsgd.tasks.MODELS`,
`DATASETS`) are the source of truth, but importing them imports torch, which takes seconds: far
too long for a help screen. This module mirrors their names and summary lines as plain data.
`tests/test_cli_fast.py` checks that it equals them and, when it does not, prints the text to
paste here; so adding an algorithm, model or data set means adding its line below as well.
"""

from __future__ import annotations

#: algorithm name -> the class's `summary_line`
ALGORITHMS: dict[str, str] = {
    "allreduce": "synchronous SGD, gradients averaged by all-reduce in flat buckets",
    "diloco": "DiLoCo / Streaming DiLoCo: H inner steps, outer Nesterov on averaged pseudo-gradients "
    "(algo.fragments, overlap_steps, compressor)",
    "dist_ef_sgd": "dist-EF-SGD: two-way compression, Nesterov momentum, worker + server error feedback",
    "downpour": "asynchronous parameter server on rank 0: push updates every n_push, fetch every n_fetch",
    "dpsgd": "decentralized parallel SGD: gossip averaging with neighbours by a mixing matrix",
    "easgd": "elastic averaging SGD/EAMSGD: replicated center (sync, async) or parameter server "
    "(async-server)",
    "ef_sgd": "error-feedback SGD over any compressor (algo.compressor=topk, block_sign, qsgd, ...)",
    "fp16": "ef_sgd with float16 gradients (all-reduced)",
    "local_sgd": "local SGD: models averaged by all-reduce every tau steps",
    "lsgd": "Leader SGD: periodic pull toward the best worker (local/global leaders, sync or async)",
    "powersgd": "PowerSGD: rank-r power iteration with warm start and error feedback, all-reduced",
    "qdsgd": "quantized decentralized SGD: neighbours' models through an unbiased quantizer",
    "qsgd": "ef_sgd with QSGD quantisation (int8 levels, no error feedback by default)",
    "quantimed": "QuanTimed-DSGD: deadline-bounded local gradients, quantized gossip with neighbours",
    "randomk": "ef_sgd with random-k sparsification (10%, unscaled, shared indices, all-reduced, "
    "no error feedback)",
    "sgd": "plain SGD on one worker (no communication)",
    "signum": "signSGD with momentum, packed signs all-gathered, majority vote (x -= lr_scale*lr*vote)",
    "topk": "ef_sgd with top-k sparsification and error feedback",
}

#: `commsgd.tasks.MODELS`, in its order
MODELS: tuple[str, ...] = (
    "mlp",
    "sigmoid_mlp",
    "logreg",
    "cnn_small",
    "cnn7",
    "resnet20",
    "vgg16",
    "resnet50",
    "lstm",
)

#: `commsgd.tasks.DATASETS`, in its order
DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10", "imagefolder", "text")


def text() -> str:
    """The catalogue as `commsgd list` prints it."""
    lines = ["algorithms:"]
    lines += [f"  {name:<12} {summary}" for name, summary in sorted(ALGORITHMS.items())]
    lines.append(f"models:     {', '.join(MODELS)}")
    lines.append(f"datasets:   {', '.join(DATASETS)}")
    return "\n".join(lines)
