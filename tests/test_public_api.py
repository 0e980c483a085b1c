"""The public surface is explicit and stable."""

import inspect
import re
import textwrap

import torch

import fastema
from fastema.core.schedules import SwitchEMA


def test_all_lists_the_public_api():
    assert sorted(fastema.__all__) == [
        "BEMA",
        "DecayWarmup",
        "EMACallback",
        "EMASchedule",
        "ExponentialWarmup",
        "InverseGammaWarmup",
        "ModelEMA",
        "PostHocEMA",
        "PostHocEMACallback",
        "SwitchEMA",
        "__version__",
        "synthesize",
    ]
    for name in fastema.__all__:
        assert getattr(fastema, name) is not None


# Keyword arguments that fastema adds after the seed's, in this order.
ADDED_ARGUMENTS = [
    ("flatten_model", False),
    ("ema_dtype", None),
    ("update_every", 1),
    ("switch_every", None),
    ("compile", None),
]


def test_callback_signatures_match_the_contract():
    ema = inspect.signature(fastema.EMACallback).parameters
    assert [(n, p.default) for n, p in ema.items()] == [
        ("decay", 0.9998),
        ("start", 0),
        ("ema_device", None),
        ("validate_ema", True),
        ("replace_weights", False),
        ("foreach", None),
        ("resume", False),
        ("all_parameters", False),
        ("all_buffers", False),
        ("skip_ema", True),
        *ADDED_ARGUMENTS,
        ("half_life", None),
        ("batch_size", None),
    ]
    from fastai.callback.schedule import SchedCos

    schedule = inspect.signature(fastema.EMASchedule).parameters
    assert [(n, p.default) for n, p in schedule.items()] == [
        ("start_decay", 0.9),
        ("final_decay", 0.9998),
        ("start", 0),
        ("finish", 0.3),
        ("schedule", SchedCos),
        ("ema_device", None),
        ("validate_ema", True),
        ("replace_weights", False),
        ("foreach", None),
        ("resume", False),
        ("all_parameters", False),
        ("all_buffers", False),
        ("skip_ema", True),
        *ADDED_ARGUMENTS,
    ]


SWITCH = SwitchEMA(2, unit="step")
# A value other than the default for each option EMACallback and EMASchedule share.
SHARED_VALUES = dict(
    ema_device="cpu",
    validate_ema=False,
    replace_weights=True,
    foreach=False,
    resume=True,
    all_parameters=True,
    all_buffers=True,
    flatten_model=True,
    ema_dtype=torch.float64,
    update_every=3,
    switch_every=fastema.SwitchEMA(every=2, unit="step"),
    compile=False,
)


def test_the_shared_options_are_listed_once_and_every_one_reaches_both_callbacks():
    from fastema.fastai.callbacks import SHARED_OPTIONS

    for callback in (fastema.EMACallback, fastema.EMASchedule):
        names = list(inspect.signature(callback).parameters)
        assert [name for name in names if name in SHARED_OPTIONS] == list(SHARED_OPTIONS)
        assert set(names) - set(SHARED_OPTIONS) <= {
            "decay",
            "start_decay",
            "final_decay",
            "start",
            "finish",
            "schedule",
            "skip_ema",
            "half_life",
            "batch_size",
        }
    assert sorted(SHARED_VALUES) == sorted(SHARED_OPTIONS)
    for name, value in SHARED_VALUES.items():
        arguments = {name: value, **({"foreach": None} if name == "flatten_model" else {})}
        for callback in (fastema.EMACallback(**arguments), fastema.EMASchedule(**arguments)):
            assert getattr(callback, name) == value, (type(callback).__name__, name)


def test_engine_does_not_import_fastai():
    import subprocess
    import sys

    code = "import sys, fastema; fastema.ModelEMA; assert 'fastai' not in sys.modules, 'engine imported fastai'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_api_reference_documents_every_public_name():
    from pathlib import Path

    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: fastema\.(?:fastai\.)?(\w+)$", reference, flags=re.MULTILINE))
    assert set(fastema.__all__) - {"__version__"} <= documented


MISSING_EXTRAS = textwrap.dedent(
    """
    import subprocess, sys

    def without(blocked, run):
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in blocked}
        saved.update({name: sys.modules.pop(name) for name in list(sys.modules) if name.startswith("fastema.")})
        sys.modules.update(dict.fromkeys(blocked))  # None: importing it raises ModuleNotFoundError
        try:
            run()
        except (ImportError, SystemExit) as error:
            print(type(error).__name__, error)
        finally:
            for name in blocked:
                del sys.modules[name]
            sys.modules.update(saved)

    import fastema, fastema.__main__
    without(["lightning", "pytorch_lightning"], lambda: __import__("fastema.lightning"))
    without(["transformers"], lambda: __import__("fastema.transformers"))
    without(["diffusers"], lambda: __import__("fastema.diffusers"))
    without(["fastai", "fastcore"], lambda: fastema.EMACallback)
    without(["matplotlib"], lambda: fastema.__main__.main(["demo", "--epochs", "1"]))
    """
)


def test_a_missing_extra_says_which_extra_to_install():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MISSING_EXTRAS], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines == [
        'ImportError fastema.lightning needs lightning, which is not installed: pip install "fastema[lightning]"',
        "ImportError fastema.transformers needs transformers, which is not installed: pip install "
        '"fastema[transformers]"',
        'ImportError fastema.diffusers needs diffusers, which is not installed: pip install "fastema[diffusers]"',
        "ImportError fastema.fastai (the fastai callbacks) needs fastai, which is not installed: pip install "
        '"fastema[fastai]"',
        'SystemExit fastema demo needs matplotlib, which is not installed: pip install "fastema[demo]"',
    ], result.stdout + result.stderr
