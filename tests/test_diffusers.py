"""`fastema.diffusers.EMAModel` against diffusers' own `EMAModel` and a float64 reference, on a tiny real UNet."""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel as DiffusersEMAModel

from fastema import ModelEMA
from fastema.diffusers import EMAModel

# diffusers' own `EMAModel.from_pretrained` passes a folder to `from_config`, which diffusers deprecates.
DIFFUSERS_FROM_PRETRAINED = "ignore:It is deprecated to pass a pretrained model name or path:FutureWarning"

WARMUP = dict(decay=0.9, min_decay=0.05, update_after_step=2, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
NO_WARMUP = dict(decay=0.75, min_decay=0.0, update_after_step=0, use_ema_warmup=False)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def train_step(model, optimizer, step: int, backward=None) -> None:
    """One denoising step on data fixed by `step`, so that a resumed run sees what an uninterrupted one did."""
    generator = torch.Generator().manual_seed(step)
    noise = torch.randn(2, 1, 8, 8, generator=generator).to(model.dtype)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    loss = (model(noise, timesteps).sample - noise).square().mean()
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad()


def reference_decay(step, decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False, inv_gamma=1.0, power=2 / 3):
    """diffusers' schedule, written from its formula: 0 up to `update_after_step + 1`, then the warm-up, clamped."""
    t = step - update_after_step - 1
    if t <= 0:
        return 0.0
    value = 1 - (1 + t / inv_gamma) ** -power if use_ema_warmup else (1 + t) / (10 + t)
    return max(min(value, decay), min_decay)


class ReferenceShadow:
    """diffusers' update in float64, one tensor at a time: averaged if it requires grad, copied if not."""

    def __init__(self, parameters):
        self.shadow = [p.detach().double().clone() for p in parameters]

    def step(self, parameters, decay: float) -> None:
        for index, p in enumerate(parameters):
            value = p.detach().double()
            self.shadow[index] = (
                self.shadow[index] - (1 - decay) * (self.shadow[index] - value) if p.requires_grad else value.clone()
            )


def assert_shadows_close(ours, theirs, rtol=1e-6, atol=1e-7):
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=f"shadow #{index}")


def assert_shadows_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"shadow #{index}"


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("settings", [WARMUP, NO_WARMUP], ids=["warmup", "no-warmup"])
def test_every_step_matches_diffusers_and_the_float64_reference(settings, foreach):
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    frozen = model.conv_in.weight
    theirs = DiffusersEMAModel(model.parameters(), foreach=foreach, **settings)
    ours = EMAModel(model.parameters(), foreach=foreach, **settings)
    reference = ReferenceShadow(model.parameters())
    for step in range(1, 9):
        if step == 4:
            frozen.requires_grad_(False)  # frozen from now on: copied, not averaged
        if step == 7:
            frozen.requires_grad_(True)  # and averaged again
        train_step(model, optimizer, step)
        if not frozen.requires_grad:
            with torch.no_grad():
                frozen.mul_(1.5)  # a frozen parameter changed by hand: the EMA copies it
        theirs.step(model.parameters())
        ours.step(model.parameters())
        decay = reference_decay(step, **settings)
        reference.step(model.parameters(), decay)
        assert ours.optimization_step == theirs.optimization_step == step
        assert ours.cur_decay_value == theirs.cur_decay_value == decay
        assert ours.get_decay(step) == theirs.get_decay(step)
        assert_shadows_close(ours.shadow_params, theirs.shadow_params)
        assert_shadows_close(ours.shadow_params, reference.shadow, rtol=1e-5, atol=1e-6)
    assert ours.cur_decay_value > 0.4  # past the copying steps: the steps above averaged


def test_while_nothing_requires_grad_everything_is_copied():
    model = tiny_unet().requires_grad_(False)
    theirs = DiffusersEMAModel(model.parameters(), **NO_WARMUP)
    ours = EMAModel(model.parameters(), **NO_WARMUP)
    for step in range(1, 4):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.5)
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value == reference_decay(step, **NO_WARMUP)
        assert_shadows_equal(theirs.shadow_params, list(model.parameters()))
        assert_shadows_equal(ours.shadow_params, list(model.parameters()))


def test_an_ema_built_from_a_copy_follows_the_model_it_is_stepped_with():
    """train_text_to_image.py: the EMA is built from a copy of the UNet and stepped with the one that trains."""
    model = tiny_unet()
    copy_for_ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs = DiffusersEMAModel(copy.deepcopy(copy_for_ema).parameters(), **WARMUP)
    ours = EMAModel(copy_for_ema.parameters(), **WARMUP)
    ours.to(torch.device("cpu"))  # what the script does next (accelerator.device)
    del copy_for_ema
    for step in range(1, 7):
        train_step(model, optimizer, step)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert_shadows_close(ours.shadow_params, theirs.shadow_params)
    ours.copy_to(model.parameters())
    assert_shadows_equal(list(model.parameters()), ours.shadow_params)


def test_state_dicts_load_both_ways_and_continue_alike():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs = DiffusersEMAModel(model.parameters(), foreach=True, **WARMUP)
    ours = EMAModel(model.parameters(), **WARMUP)
    for step in range(1, 5):
        train_step(model, optimizer, step)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    # Each loads the other's state into an EMA built with other settings, through torch.save as accelerate does.
    ours_from_theirs = EMAModel(model.parameters(), decay=0.5)
    theirs_from_ours = DiffusersEMAModel(model.parameters(), decay=0.5)
    ours_from_theirs.load_state_dict(_saved_and_loaded(theirs.state_dict()))
    theirs_from_ours.load_state_dict(_saved_and_loaded(ours.state_dict()))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for loaded, source in ((ours_from_theirs, theirs), (theirs_from_ours, ours)):
        assert {k: v for k, v in loaded.state_dict().items() if k != "shadow_params"} == {
            k: v for k, v in source.state_dict().items() if k != "shadow_params"
        }
        assert_shadows_equal(loaded.shadow_params, source.shadow_params)
    for step in range(5, 8):
        train_step(model, optimizer, step)
        for ema in (theirs, ours, ours_from_theirs, theirs_from_ours):
            ema.step(model.parameters())
        assert ours_from_theirs.cur_decay_value == theirs.cur_decay_value == theirs_from_ours.cur_decay_value
    assert_shadows_close(ours_from_theirs.shadow_params, theirs.shadow_params)
    assert_shadows_close(theirs_from_ours.shadow_params, ours.shadow_params)


def _saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.filterwarnings(DIFFUSERS_FROM_PRETRAINED)
def test_save_pretrained_folders_load_both_ways(tmp_path):
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = dict(model_cls=UNet2DModel, model_config=model.config)
    theirs = DiffusersEMAModel(model.parameters(), **WARMUP, **config)
    ours = EMAModel(model.parameters(), **WARMUP, **config)
    for step in range(1, 5):
        train_step(model, optimizer, step)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    ours_from_theirs = EMAModel.from_pretrained(tmp_path / "theirs", UNet2DModel)
    theirs_from_ours = DiffusersEMAModel.from_pretrained(str(tmp_path / "ours"), UNet2DModel)
    for loaded, source in ((ours_from_theirs, theirs), (theirs_from_ours, ours)):
        assert loaded.optimization_step == 4 and loaded.use_ema_warmup and loaded.min_decay == 0.05
        assert loaded.decay == 0.9 and loaded.update_after_step == 2 and loaded.power == 2 / 3
        assert_shadows_equal(loaded.shadow_params, source.shadow_params)
    train_step(model, optimizer, 5)
    for ema in (theirs, ours, ours_from_theirs, theirs_from_ours):
        ema.step(model.parameters())
    assert ours_from_theirs.cur_decay_value == theirs.cur_decay_value == reference_decay(5, **WARMUP)
    assert_shadows_close(ours_from_theirs.shadow_params, theirs.shadow_params)
    assert_shadows_close(theirs_from_ours.shadow_params, ours.shadow_params)


def run_with_accelerate(tmp_path, steps: int, save_at: int | None = None, resume: bool = False):
    """The EMA part of diffusers' train_unconditional.py: accelerate hooks save and load it in `unet_ema/`."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_unet(seed=1 if resume else 0)  # resuming starts from other weights: all must come from the checkpoint
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema_model = EMAModel(model.parameters(), **WARMUP, model_cls=UNet2DModel, model_config=model.config)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                model.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    def load_model_hook(models, input_dir):
        load_model = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
        ema_model.load_state_dict(load_model.state_dict())
        ema_model.to(accelerator.device)
        del load_model
        for _ in range(len(models)):
            model = models.pop()
            load_model = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**load_model.config)
            model.load_state_dict(load_model.state_dict())
            del load_model

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema_model.to(accelerator.device)
    first = 1
    if resume:
        accelerator.load_state(str(tmp_path / "checkpoint"))
        first = ema_model.optimization_step + 1
    for step in range(first, steps + 1):
        train_step(model, optimizer, step, backward=accelerator.backward)
        ema_model.step(model.parameters())
        if step == save_at:
            accelerator.save_state(str(tmp_path / "checkpoint"))
    return ema_model, model


def test_accelerate_save_and_load_hooks_resume_bit_exactly(tmp_path):
    uninterrupted, model = run_with_accelerate(tmp_path, steps=6)
    run_with_accelerate(tmp_path, steps=3, save_at=3)
    resumed, resumed_model = run_with_accelerate(tmp_path, steps=6, resume=True)
    assert resumed.optimization_step == uninterrupted.optimization_step == 6
    assert resumed.cur_decay_value == uninterrupted.cur_decay_value
    assert_shadows_equal(list(resumed_model.parameters()), list(model.parameters()))
    assert_shadows_equal(resumed.shadow_params, uninterrupted.shadow_params)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_store_copy_to_restore_evaluates_with_the_ema_and_puts_the_model_back(foreach):
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), foreach=foreach, **NO_WARMUP)
    for step in range(1, 4):
        train_step(model, optimizer, step)
        ema.step(model.parameters())
    trained = [p.detach().clone() for p in model.parameters()]
    ema.store(model.parameters())
    assert all(saved.device.type == "cpu" for saved in ema.temp_stored_params)
    ema.copy_to(model.parameters())
    assert_shadows_equal(list(model.parameters()), ema.shadow_params)
    assert not torch.equal(next(model.parameters()), trained[0])
    ema.restore(model.parameters())
    assert_shadows_equal(list(model.parameters()), trained)
    assert ema.temp_stored_params is None
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model.parameters())


@pytest.mark.cuda
def test_an_ema_offloaded_to_the_host_steps_evaluates_and_restores_a_cuda_model():
    model = tiny_unet().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs = DiffusersEMAModel(model.parameters(), foreach=True, **WARMUP)
    ours = EMAModel(model.parameters(), foreach=True, **WARMUP)
    ours.to("cpu")
    for step in range(1, 6):
        train_step(model, optimizer, step)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert all(tensor.device.type == "cpu" for tensor in ours.shadow_params)
    assert_shadows_close(ours.shadow_params, [tensor.cpu() for tensor in theirs.shadow_params], rtol=1e-5, atol=1e-6)
    trained = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    assert_shadows_equal([p.cpu() for p in model.parameters()], ours.shadow_params)
    ours.restore(model.parameters())
    assert_shadows_equal(list(model.parameters()), trained)
    ours.store(model.parameters())
    assert all(saved.device.type == "cpu" for saved in ours.temp_stored_params)  # host copies, as documented


def test_to_float32_keeps_a_float32_ema_of_a_bfloat16_model():
    model = tiny_unet().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ours = EMAModel(model.parameters(), decay=0.999, update_after_step=0)
    ours.to(dtype=torch.float32)
    reference = ReferenceShadow(model.parameters())
    for step in range(1, 6):
        train_step(model, optimizer, step)
        ours.step(model.parameters())
        reference.step(model.parameters(), reference_decay(step, decay=0.999))
    assert all(tensor.dtype == torch.float32 for tensor in ours.shadow_params)
    assert_shadows_close(ours.shadow_params, reference.shadow, rtol=1e-5, atol=1e-6)
    ours.copy_to(model.parameters())  # back into the bfloat16 model, rounded
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_module_gets_its_engine_and_diffusers_warm_up():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(FutureWarning, match="nn.Module"):
        theirs = DiffusersEMAModel(model, decay=0.9)
    ours = EMAModel(model, decay=0.9)
    assert ours.use_ema_warmup and theirs.use_ema_warmup  # diffusers turns it on for a module
    assert ours.engine.model is model
    for step in range(1, 5):
        train_step(model, optimizer, step)
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
    assert_shadows_close(ours.shadow_params, theirs.shadow_params)
    averaged = ours.engine.module  # an averaged UNet, ready to evaluate
    assert isinstance(averaged, UNet2DModel)
    sample = torch.randn(1, 1, 8, 8)
    averaged(sample, torch.tensor([10]))
    with pytest.raises(ValueError, match="built on a module"):
        ours.step(tiny_unet(seed=3).parameters())


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    model = tiny_unet()
    ema = EMAModel(model.parameters(), **WARMUP, model_cls=UNet2DModel, model_config=model.config)
    ema.step(model.parameters())
    before = [tensor.clone() for tensor in ema.shadow_params]
    other = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="Invalid parameters"):
        ema.step(other.parameters())
    with pytest.raises(ValueError, match="Invalid parameters"):
        ema.copy_to(other.parameters())
    other_state = EMAModel(other.parameters(), decay=0.5).state_dict()
    with pytest.raises(ValueError, match="shadow_params"):
        ema.load_state_dict(other_state)
    with pytest.raises(ValueError, match=r"state_dict\['min_decay'\]"):
        ema.load_state_dict({**ema.state_dict(), "decay": 0.5, "min_decay": "0.1"})
    with pytest.raises(TypeError, match="state_dict"):
        ema.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="int16"):  # it would truncate the EMA
        ema.load_state_dict({"shadow_params": [tensor.to(torch.int16) for tensor in before]})
    assert ema.optimization_step == 1 and ema.decay == 0.9  # nothing half-loaded
    assert_shadows_equal(ema.shadow_params, before)
    model.save_pretrained(tmp_path / "plain")  # a model folder, no EMA settings
    with pytest.raises(ValueError, match="no EMA settings"):
        EMAModel.from_pretrained(tmp_path / "plain", UNet2DModel)
    with pytest.raises(TypeError, match="unexpected keyword"):
        EMAModel(model.parameters(), decay_rate=0.9)
    with pytest.raises(ValueError, match="Invalid decay"):
        EMAModel(model.parameters(), decay=1.5)
    with pytest.raises(ValueError, match="empty"):
        EMAModel([])
    with pytest.raises(TypeError, match="Invalid dtype"):
        ema.to(dtype=torch.int64)
    ema.store(model.parameters())
    with pytest.raises(ValueError, match="store"):
        ema.restore(other.parameters())
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(model.parameters()).save_pretrained(tmp_path / "nowhere")


def test_deprecated_keyword_arguments_work_as_in_diffusers():
    model = tiny_unet()
    with pytest.warns(FutureWarning) as warned:
        ema = EMAModel(model.parameters(), max_value=0.8, min_value=0.1, device="cpu")
    assert [str(warning.message).split("=")[0] for warning in warned] == [
        "EMAModel(max_value",
        "EMAModel(min_value",
        "EMAModel(device",
    ]
    assert (ema.decay, ema.min_decay) == (0.8, 0.1)
    assert ema.engine.device == torch.device("cpu")  # placed by to(device=...): kept there for good


@pytest.mark.parametrize("kind", ["module", "parameters"])
def test_the_ema_keeps_its_dtype_when_the_model_is_cast_and_the_engines_are_rebuilt(kind):
    model = tiny_unet()
    ema = EMAModel(model if kind == "module" else model.parameters(), decay=0.9)
    model.to(torch.bfloat16)  # after the EMA was built: the EMA stays float32
    ema.step(model.parameters())
    averaged = [tensor.clone() for tensor in ema.shadow_params]
    assert all(tensor.dtype == torch.float32 for tensor in averaged)
    ema.to(device="cpu")  # rebuilds the engines from the EMA's values: none rounded
    assert_shadows_equal(ema.shadow_params, averaged)
    model.conv_in.weight.requires_grad_(False)  # a new split rebuilds them too
    ema.step(model.parameters())
    assert all(tensor.dtype == torch.float32 for tensor in ema.shadow_params)


def test_a_rebuild_never_rounds_a_module_ema_of_mixed_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    ema = EMAModel(model, decay=0.9)
    model.to(torch.float16)
    ema.step(model.parameters())  # the EMA keeps float32 and bfloat16 tensors
    before = [tensor.clone() for tensor in ema.shadow_params]
    ema.to(device="cpu")  # one engine, one dtype: the widest, float32
    assert [tensor.dtype for tensor in ema.shadow_params] == [torch.float32] * 4
    assert_shadows_equal([tensor.double() for tensor in ema.shadow_params], [tensor.double() for tensor in before])


def test_a_state_that_fails_to_load_loads_nothing_in_any_part():
    model = tiny_unet()
    model.conv_out.requires_grad_(False)  # a second engine copies the frozen parameters
    ema = EMAModel(model.parameters(), decay=0.9)
    ema.step(model.parameters())
    assert len(ema._engines.parts) == 2
    before = [tensor.clone() for tensor in ema.shadow_params]
    frozen = [name for name, _ in model.named_parameters()].index("conv_out.weight")
    for bad in (torch.empty(before[frozen].shape, device="meta"), torch.ones(before[frozen].shape, dtype=torch.int64)):
        shadow = [torch.zeros_like(tensor) for tensor in before]
        shadow[frozen] = bad  # every other tensor is fine, and the part that averages comes first
        with pytest.raises(ValueError, match=f"#{frozen}"):
            ema.load_state_dict({"optimization_step": 7, "shadow_params": shadow})
        assert ema.optimization_step == 1
        assert_shadows_equal(ema.shadow_params, before)


def test_frozen_parameters_and_steps_of_decay_0_are_exact_copies_even_of_values_that_are_not_finite():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    theirs = DiffusersEMAModel(model.parameters(), update_after_step=1)
    ours = EMAModel(model.parameters(), update_after_step=1)  # steps 1 and 2 have decay 0: copies
    for value in (float("-inf"), 1.0):  # the second step copies finite values again
        with torch.no_grad():
            model.bias.fill_(value)
            model.weight[0, 0] = -value
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value == 0.0
        assert_shadows_equal(ours.shadow_params[1:], theirs.shadow_params[1:])  # frozen: copied alike
        assert_shadows_equal(ours.shadow_params, list(model.parameters()))


def test_the_ema_holds_neither_the_copy_it_was_built_from_nor_the_model_in_its_copies_and_pickles():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copy_for_ema = copy.deepcopy(model)
    built_from = weakref.ref(next(copy_for_ema.parameters()))
    ema = EMAModel(copy_for_ema.parameters(), **NO_WARMUP)
    theirs = DiffusersEMAModel(copy_for_ema.parameters(), **NO_WARMUP)
    del copy_for_ema
    gc.collect()
    assert built_from() is None  # freed at once, as diffusers' clones let it go
    for step in range(1, 3):
        train_step(model, optimizer, step)
        ema.step(model.parameters())
        theirs.step(model.parameters())
    sizes = []
    for whole in (ema, theirs):  # both hold the EMA's values and the settings, not the model's tensors
        buffer = io.BytesIO()
        torch.save(whole, buffer)
        sizes.append(buffer.tell())
    assert sizes[0] < 1.1 * sizes[1]
    copied = copy.deepcopy(ema)
    train_step(model, optimizer, 3)
    for each in (copied, ema, theirs):
        each.step(model.parameters())
    assert_shadows_equal(copied.shadow_params, ema.shadow_params)
    assert_shadows_close(ema.shadow_params, theirs.shadow_params)
    assert copied.shadow_params[0].data_ptr() != ema.shadow_params[0].data_ptr()


def test_plain_tensors_whose_data_is_replaced_are_followed():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]  # not nn.Parameters
    theirs = DiffusersEMAModel(tensors, **NO_WARMUP)
    ours = EMAModel(tensors, **NO_WARMUP)
    for step in range(1, 4):
        for tensor in tensors:
            tensor.data = tensor.data + step  # new storage, same tensor objects
        theirs.step(tensors)
        ours.step(tensors)
        assert ours.cur_decay_value == theirs.cur_decay_value
        assert_shadows_close(ours.shadow_params, theirs.shadow_params)


def test_the_parameters_read_last_are_not_paired_again_and_others_are_followed(monkeypatch):
    from fastema.core.tracker import Tracker

    model, other = tiny_unet(), tiny_unet(seed=3)
    theirs = DiffusersEMAModel(model.parameters(), **NO_WARMUP)
    ours = EMAModel(model.parameters(), **NO_WARMUP)
    ours.step(model.parameters())  # pairs the engine with these parameters
    theirs.step(model.parameters())
    follow = Tracker.follow  # checks the pairs (a pass over the model), and pairs anew where they changed
    pairings = []
    monkeypatch.setattr(Tracker, "follow", lambda tracker, *args: (pairings.append(tracker), follow(tracker, *args))[1])
    for parameters, paired in ((model, False), (model, False), (other, True), (other, False)):
        pairings.clear()
        ours.step(parameters.parameters())
        theirs.step(parameters.parameters())
        assert bool(pairings) == paired
    assert_shadows_close(ours.shadow_params, theirs.shadow_params)


@pytest.mark.filterwarnings(DIFFUSERS_FROM_PRETRAINED)
def test_from_pretrained_takes_defaults_for_missing_settings_as_diffusers_does_and_passes_foreach(tmp_path):
    model = tiny_unet()
    EMAModel(model.parameters(), **WARMUP, model_cls=UNet2DModel, model_config=model.config).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["min_decay"], config["power"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = DiffusersEMAModel.from_pretrained(str(tmp_path), UNet2DModel)
    ours = EMAModel.from_pretrained(tmp_path, UNet2DModel, foreach=True)
    assert {k: v for k, v in ours.state_dict().items() if k != "shadow_params"} == {
        k: v for k, v in theirs.state_dict().items() if k != "shadow_params"
    }
    assert (ours.min_decay, ours.power, ours.decay) == (0.0, 2 / 3, 0.9)
    assert ours.foreach is True


def test_load_state_dict_keeps_what_a_state_lacks_and_refuses_a_state_of_something_else():
    model = tiny_unet()
    ema = EMAModel(model.parameters(), **WARMUP)
    ema.step(model.parameters())
    shadow = [tensor.clone() for tensor in ema.shadow_params]
    ema.load_state_dict({"optimization_step": 5})  # the settings and the EMA it lacks keep their values
    assert ema.optimization_step == 5 and ema.decay == WARMUP["decay"]
    assert_shadows_equal(ema.shadow_params, shadow)
    ema.load_state_dict({"shadow_params": [tensor + 1 for tensor in shadow]})
    assert ema.optimization_step == 5
    assert_shadows_equal(ema.shadow_params, [tensor + 1 for tensor in shadow])
    for other in ({}, ModelEMA(model).state_dict()):  # silently nothing in diffusers
        with pytest.raises(ValueError, match="not an EMAModel state"):
            ema.load_state_dict(other)


def test_integer_settings_may_be_any_integral_number_as_in_diffusers():
    model = tiny_unet()
    ema = EMAModel(model.parameters(), update_after_step=np.int64(3))
    assert ema.update_after_step == 3 and type(ema.update_after_step) is int
    assert ema.get_decay(5) == DiffusersEMAModel(model.parameters(), update_after_step=np.int64(3)).get_decay(5)
    ema.load_state_dict({"optimization_step": np.int32(4)})
    assert ema.optimization_step == 4 and type(ema.optimization_step) is int
    with pytest.raises(ValueError, match="update_after_step"):
        EMAModel(model.parameters(), update_after_step=True)


def test_shadow_params_are_the_live_ema_tensors_as_in_diffusers_and_pin_memory_keeps_them_in_host_memory():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), **NO_WARMUP)
    shadow = ema.shadow_params
    for step in range(1, 3):
        train_step(model, optimizer, step)
        ema.step(model.parameters())
    assert_shadows_equal(shadow, ema.shadow_params)  # updated in place
    with torch.no_grad():
        shadow[0].fill_(7.0)  # a write through them is a write to the EMA
    ema.copy_to(model.parameters())
    assert bool((next(model.parameters()) == 7.0).all())
    ema.pin_memory()
    assert ema.engine.device == torch.device("cpu")  # placed in host memory for good, as to("cpu")
    assert_shadows_equal(ema.shadow_params, shadow)


def test_a_tensor_given_twice_is_refused():
    parameters = list(tiny_unet().parameters())
    with pytest.raises(ValueError, match="twice"):
        EMAModel([parameters[0], parameters[0]])
    ema = EMAModel(parameters[:2])
    with pytest.raises(ValueError, match="twice"):
        ema.step([parameters[0], parameters[0]])
