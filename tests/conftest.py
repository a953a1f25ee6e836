"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it happens here, at collection
start.  DeepSpeed is pointed at its CPU accelerator the same way.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs in bench/gpu_runbook.sh on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (`make test` runs -n 2) the suite ends when its longest test does: hand out the
        # multi-process and long runs first so they overlap the many short ones instead of trailing them.
        # Every worker sorts the same collection the same way, as xdist requires.
        items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_report_header(config):
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return ("WARNING: no CUDA and TRITON_INTERPRET != 1: the Triton kernels cannot run, every kernel "
                "test that asserts its launches will fail")
    return None


@pytest.fixture
def launches():
    """A ``LaunchLedger`` (kernel name -> Triton launches) counting during the test. Assert with
    ``launches.require("_rms_norm_fwd_kernel")``: a test whose kernel never ran (a CPU without
    TRITON_INTERPRET=1, a fallback taken by mistake) then fails instead of comparing the reference
    with itself."""
    from tritium.kernels._runtime import count_launches

    with count_launches() as ledger:
        yield ledger


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process training fills in a 1-rank world (RANK, MASTER_PORT, ...); keep it out of later tests
    and of the subprocesses they start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run many tiny ops: on a shared 2-core box torch's intra-op pool spends more time
    synchronising than computing (measured 10-20x slower), so each test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- shared tokenizer and data
# Trained once per test session (about a second) so any test can use a real sentencepiece tokenizer.
TINY_TOKENIZER_VOCAB = 2048
TINY_CORPUS_BYTES = 1_000_000


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder holding ``tokenizer.model``: vocab 2048 BPE trained on ~1 MB of the embedded corpus."""
    from tritium.model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(None, TINY_TOKENIZER_VOCAB, out, max_bytes=TINY_CORPUS_BYTES)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The ``Tokenizer`` loaded from ``tiny_tokenizer_dir``."""
    from tritium.model.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_tokenizer_dir, tmp_path_factory):
    """Shards + manifest.json of ~300 KB of the embedded corpus, tokenized with ``tiny_tokenizer_dir``."""
    from tritium.model.corpus import embedded_corpus_files
    from tritium.model.tokenizer import Tokenizer
    from tritium.train.data import prepare_data

    out = tmp_path_factory.mktemp("tiny_data")
    prepare_data(embedded_corpus_files(max_bytes=300_000), Tokenizer.load(tiny_tokenizer_dir), out,
                 val_fraction=0.1, seed=0)
    return out
