"""Test set-up: Triton runs in its CPU interpreter when no CUDA device is present; no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def default_float64():
    """torch's default dtype set to float64 for one test: buffers that must be fp32 have to say so."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def model_dir(tmp_path):
    """A folder that passes the CLI's model check (a config.json); the tests that use it never load it."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def built_trainers(monkeypatch):
    """Every `TPOTrainer` built while the test runs (the recipes and the demo import it when called), each with
    `initial`: its model's weights as it got them. Set `.stop = True` to make `train()` raise `.Stopped` instead
    of training (to read what a function hands the trainer without the run)."""
    from tpo_fast.trainer import trainer as trainer_module

    class Built(list):
        stop = False

        class Stopped(Exception):
            pass

    built = Built()

    class Recorded(trainer_module.TPOTrainer):
        def __init__(self, model, *args, **kwargs):
            self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
            super().__init__(model, *args, **kwargs)
            built.append(self)

        def train(self, *args, **kwargs):
            if built.stop:
                raise Built.Stopped
            return super().train(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "TPOTrainer", Recorded)
    return built


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_runtest_logreport(report):
    """With TPO_FAST_FAILURE_LOG set, each failure's traceback is appended to that file as it happens, not at the
    session's end: a device run cut by its time limit (scripts/gpu_check.sh) still brings back why tests failed.
    Under pytest-xdist only the controlling process writes (the workers' reports reach it too)."""
    path = os.environ.get("TPO_FAST_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
