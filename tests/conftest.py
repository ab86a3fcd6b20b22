# Test-wide setup. Triton decides at import time whether @triton.jit kernels are compiled or
# interpreted, so on a machine without CUDA we switch the interpreter on before anything imports
# triton; the kernel tests then run every Triton kernel on CPU against its PyTorch reference.
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tensors are tiny: one thread per process avoids oversubscribing the cores (the
# 2-process training tests run beside pytest itself), which costs far more than it saves.
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """One small sentencepiece tokenizer for every training run of the suite (training it is the
    slow part of a tiny start)."""
    import warm_start
    from tokenizer import train_sentencepiece
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_sentencepiece(warm_start.tiny_corpus(num=80), 512, path)
    return str(path)
