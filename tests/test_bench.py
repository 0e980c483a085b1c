"""`fastema bench`: its competitor steps compute the same EMA as the reference, and its report is complete."""

import json

import pytest
import torch
from torch import nn

from fastema import bench
from fastema.__main__ import main
from helpers import ToyNet
from reference import ReferenceEMA, expected_tracked


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))


def test_competitor_steps_match_the_reference():
    torch.manual_seed(0)
    model = ToyNet().double()
    model(torch.randn(4, 8, dtype=torch.float64))
    tracked = expected_tracked(model)
    names = list(tracked)
    reference = ReferenceEMA(tracked)
    loop_module, mul_add_module, lerp_module = (ToyNet().double() for _ in range(3))
    for module in (loop_module, mul_add_module, lerp_module):
        module.load_state_dict(model.state_dict())
    loop_tensors = [bench.tensors_by_name(loop_module)[name] for name in names]
    lerp_tensors = [bench.tensors_by_name(lerp_module)[name] for name in names]
    model_tensors = [tracked[name] for name in names]
    floats = [i for i, t in enumerate(model_tensors) if t.is_floating_point()]
    ints = [i for i, t in enumerate(model_tensors) if not t.is_floating_point()]
    with torch.no_grad():
        for step in range(20):
            for p in model.parameters():
                p.add_(0.1 * step)
            model(torch.randn(4, 8, dtype=torch.float64))
            bench.for_loop_step(loop_tensors, model_tensors, 0.9)
            bench.mul_add_step(mul_add_module, model, 0.9)
            bench.foreach_lerp_step(
                [lerp_tensors[i] for i in floats],
                [model_tensors[i] for i in floats],
                [lerp_tensors[i] for i in ints],
                [model_tensors[i] for i in ints],
                0.9,
            )
            reference.update(tracked, 0.9)
    for module in (loop_module, mul_add_module, lerp_module):
        tensors = bench.tensors_by_name(module)
        for name, expected in reference.state.items():
            if expected.is_floating_point():
                torch.testing.assert_close(tensors[name], expected, rtol=1e-9, atol=1e-12, msg=name)
            else:
                assert torch.equal(tensors[name], expected), name


def test_json_report_plot_and_memory(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    results = bench.run_bench(
        models=["small_cnn"],
        as_json=True,
        plot=str(plot),
        budget_s=0.001,
        train_batch=1,
        custom_models={"small_cnn": (lambda: initialised(small_cnn()), "image")},
    )
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["torch"] == torch.__version__
    (row,) = report["results"]
    assert row["model"] == "small_cnn" and row["tensors"] == 9  # conv w/b, bn w/b/mean/var/count, linear w/b
    assert set(row["ms"]) == set(bench.METHODS) and all(value > 0 for value in row["ms"].values())
    assert row["extra_memory_bytes"]["fastema"] == 0 and row["extra_memory_bytes"]["fastema flat"] == 0
    assert 0 < row["ratios"]["EMA share of train step"] < 1
    assert row["ratios"]["speedup vs mul+add"] == row["ms"]["mul+add"] / row["ms"]["fastema"]
    # PostHocEMA allocates nothing either; its ratio is against two ModelEMA updates.
    assert row["extra_memory_bytes"]["posthoc K=2"] == 0
    assert row["ratios"]["posthoc K=2 vs 2x fastema"] == row["ms"]["2x fastema"] / row["ms"]["posthoc K=2"]
    assert plot.stat().st_size > 10_000
    assert results[0].elements == sum(p.numel() for p in initialised(small_cnn()).parameters()) + 8


def initialised(model):
    model(torch.zeros(1, 3, 224, 224))  # materialise the lazy layer
    return model


def test_markdown_report_and_model_catalogue(capsys):
    bench.run_bench(
        models=["toy"],
        budget_s=0.001,
        train_batch=None,
        custom_models={"toy": (ToyNet, "image")},
    )
    out = capsys.readouterr().out
    assert "| toy |" in out and "fastema / floor" in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in bench.MODELS)  # the command line offers the whole catalogue


def test_peers_are_timed_in_the_same_run_and_the_output_is_clean(capfd):
    (result,) = bench.run_bench(
        models=["toy"], budget_s=0.001, train_batch=None, custom_models={"toy": (ToyNet, "image")}, peers=True
    )
    out, err = capfd.readouterr()
    assert "USDT" not in err and "profiler" not in err  # the profiler's C++ lines are silenced
    header = out.splitlines()[0]
    assert "ema_dtype" not in header and "ema_device" not in header  # not asked for: not reported
    for peer in bench.PEERS:  # every peer is installed by the dev extra
        assert result.ms[peer] > 0, peer
        assert result.ratios[f"{peer} / fastema"] == result.ms[peer] / result.ms["fastema"]
        assert f"| {peer} |" in out and f"| {peer} / fastema |" in out  # a time column and a ratio column
    for peer in ("diffusers EMAModel", "diffusers EMAModel foreach"):  # and against the drop-in, like for like
        assert result.ratios[f"{peer} / fastema.diffusers"] == result.ms[peer] / result.ms["fastema.diffusers EMAModel"]
    with pytest.raises(ValueError, match="peers"):
        bench.run_bench(
            models=["toy"], custom_models={"toy": (ToyNet, "image")}, peers=True, dtype="bfloat16", ema_dtype="float32"
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="models"):
        bench.run_bench(models=["resnet9000"])
    with pytest.raises(ValueError, match="dtype"):
        bench.run_bench(models=["xresnet50"], dtype="float8")
    with pytest.raises(ValueError, match="ema_dtype"):
        bench.run_bench(models=["xresnet50"], ema_dtype="float64")
    with pytest.raises(ValueError, match="ema_device"):
        bench.run_bench(models=["xresnet50"], ema_device="cpu")  # offloading needs a CUDA model


def test_bfloat16_model_with_float32_ema(capsys):
    (result,) = bench.run_bench(
        models=["toy"],
        dtype="bfloat16",
        ema_dtype="float32",
        budget_s=0.001,
        train_batch=None,
        custom_models={"toy": (ToyNet, "image")},
    )
    out = capsys.readouterr().out
    assert "ema_dtype: float32" in out and "| n/a |" in out
    assert result.ms["foreach_lerp"] is None  # `_foreach_lerp_` refuses mixed dtypes
    assert all(result.ms[m] > 0 for m in bench.METHODS if m != "foreach_lerp")
    assert "speedup vs foreach_lerp" not in result.ratios and result.ratios["fastema / floor"] > 0
    assert result.extra_memory_bytes["fastema"] == 0 and result.extra_memory_bytes["fastema flat"] == 0


@pytest.mark.cuda
def test_offloaded_bench_on_cuda(capsys):
    (result,) = bench.run_bench(
        models=["toy"],
        device="cuda",
        dtype="bfloat16",
        ema_dtype="float32",
        ema_device="cpu",
        budget_s=0.01,
        train_batch=None,
        custom_models={"toy": (ToyNet, "image")},
    )
    assert result.ms[bench.OFFLOAD_METHOD] > 0 and result.ms["fastema"] > 0
    assert "ema_device: cpu" in capsys.readouterr().out
