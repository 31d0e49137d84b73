"""``sfda_liu``: BN-statistics inversion, dual attention, IPSM, MaxSquare, the one-backward min-max, end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfdaseg.config import AdaptConfig, ConfigError, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.models import load_model, save_model
from sfdaseg.methods import RECIPES
from sfdaseg.methods.common import AdaptContext
from sfdaseg.methods.sfda_liu import (BNStatisticsLoss, Generator, PatchDiscriminator, SFDALiuConfig, build,
                                      dual_attention, grad_reverse, ipsm_losses, maxsquare_loss, patch_entropy,
                                      rank_patches, save_image_grid, to_patches)
from sfdaseg.models import build_model
from sfdaseg.runs.adapt import run_adapt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops: with two intra-op threads on a busy 2-core machine each op waits on a thread
    barrier (measured: 50 generator steps 2.5 s on one thread, 70 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_source(norm="bn"):
    """A tiny model whose BN running statistics are not the defaults (0, 1): a few train-mode passes on images
    with a colour cast set them (cumulative averages, so that they are the statistics of one input distribution,
    as after source training)."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=8, norm=norm)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(5):
            x = (torch.rand(4, 3, 32, 64) * 0.5 + torch.tensor([0.4, 0.2, 0.1])[:, None, None]).clamp(0, 1)
            model(x)
    return model.eval()


def make_task(model, export="student", **cfg):
    ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=CPU, export=export)
    task = build(ctx, SFDALiuConfig(**{"gen_width": 8, "gen_size": (32, 64), "disc_width": 8, **cfg}))
    task.wrap_trainable(lambda name, module: module)
    for m in task.trainable_modules().values():
        m.train()
    return task


# ------------------------------------------------------------------------------------------------ L_BNS


def test_bn_statistics_loss_falls_when_the_generator_trains():
    source = tiny_source()
    for p in source.parameters():
        p.requires_grad_(False)
    bns = BNStatisticsLoss(source)
    assert len(bns.layers) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in source.modules())
    torch.manual_seed(1)
    gen = Generator(z_dim=32, size=(32, 64), width=8)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        with bns.capture() as terms:
            source(gen(torch.randn(8, 32)))
        assert len(terms) == len(bns.layers)  # every BN layer contributes
        loss = torch.stack(terms).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # Adam at 1e-2 makes single steps noisy (a spike to 2x the start is common): compare the mean of the last ten
    # steps with the mean of the first three.
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:3]) / 3, losses
    with bns.capture() as terms:
        pass
    source(torch.rand(2, 3, 32, 64))
    assert terms == []  # hooks are silent outside capture()


def test_bn_statistics_term_is_the_published_l2_form():
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 0.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 1.0, 4.0]))
    x = torch.zeros(2, 3, 4, 4)
    x[:, 2] = torch.tensor([1.0, -1.0]).view(2, 1, 1)  # channel 2: mean 0, var 1
    bns = BNStatisticsLoss(bn)
    with bns.capture() as terms:
        bn(x)
    # ||(0,0,0) - (1,0,0)|| + ||(0,0,1) - (1,1,4)|| = 1 + sqrt(1 + 1 + 9)
    assert torch.allclose(terms[0], torch.tensor(1.0 + math.sqrt(11.0)))


def test_generator_output_is_an_rgb_image_in_0_1():
    gen = Generator(z_dim=16, size=(32, 64), width=4)
    x = gen(torch.randn(3, 16))
    assert x.shape == (3, 3, 32, 64) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(ValueError, match="divisible by 16"):
        Generator(size=(30, 64))


# ------------------------------------------------------------------------------------------------ dual attention


def test_dual_attention_shapes_rows_and_memory_bound():
    feats = torch.randn(2, 16, 100, 200)
    spatial, channel = dual_attention(feats, max_grid=(8, 16))
    assert spatial.shape == (2, 128, 128)  # N = 8 * 16 <= M, not 100 * 200
    assert channel.shape == (2, 16, 16)
    assert torch.allclose(spatial.sum(-1), torch.ones(2, 128), atol=1e-5)
    assert torch.allclose(channel.sum(-1), torch.ones(2, 16), atol=1e-5)
    small, _ = dual_attention(torch.randn(1, 4, 5, 6), max_grid=(8, 16))
    assert small.shape == (1, 30, 30)  # features smaller than the grid are not upsampled
    # The default bound at a realistic size (DeepLabV2 at 512x1024: 64x128 features, D=256): N = 32 * 64.
    s, c = dual_attention(torch.randn(1, 256, 64, 128))
    assert s.shape == (1, 2048, 2048) and c.shape == (1, 256, 256)


def test_gradient_reversal_negates_only_the_backward():
    x = torch.randn(4, requires_grad=True)
    y = grad_reverse(x)
    assert torch.equal(y, x)
    (2 * y).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), -2.0))


# ------------------------------------------------------------------------------------------------ target losses


def test_maxsquare_values():
    c = 4
    uniform = torch.full((2, c, 3, 5), 1.0 / c)
    assert torch.allclose(maxsquare_loss(uniform), torch.tensor(-0.5 / c ** 2))
    onehot = F.one_hot(torch.zeros(2, 3, 5, dtype=torch.long), c).permute(0, 3, 1, 2).float()
    assert torch.allclose(maxsquare_loss(onehot), torch.tensor(-0.5 / c))
    # Image-wise weighting: one image, 4 pixels, argmax class 0 on 3 of them and class 1 on 1, ratio 0.5:
    # w_0 = 1 / max(3^0.5 * 4^0.5, 1), w_1 = 1 / max(1 * 2, 1); loss = -sum(w * p^2) / (B * C).
    p = torch.tensor([[0.8, 0.8, 0.8, 0.3], [0.2, 0.2, 0.2, 0.7]]).view(1, 2, 2, 2)
    w0, w1 = 1 / (math.sqrt(3) * 2), 1 / 2
    expected = -(3 * w0 * (0.8 ** 2 + 0.2 ** 2) + w1 * (0.3 ** 2 + 0.7 ** 2)) / 2
    assert torch.allclose(maxsquare_loss(p, image_weighted=True, ratio=0.5), torch.tensor(expected))


def test_patches_are_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = to_patches(x, 2)  # (1, 4, 1, 2, 2)
    assert p.shape == (1, 4, 1, 2, 2)
    assert torch.equal(p[0, 1, 0], torch.tensor([[2.0, 3.0], [6.0, 7.0]]))  # top-right patch
    assert torch.equal(p[0, 2, 0], torch.tensor([[8.0, 9.0], [12.0, 13.0]]))  # bottom-left patch


def test_ipsm_ranks_high_entropy_patches_as_hard():
    torch.manual_seed(0)
    b, c, k = 4, 5, 3
    # Confident predictions everywhere, then uniform (maximal entropy) ones in chosen patches of chosen images.
    probs = F.one_hot(torch.randint(c, (b, 6, 9)), c).permute(0, 3, 1, 2).float() * 0.9 + 0.1 / c
    noisy = {(0, 0), (1, 0), (2, 4), (3, 4), (1, 8), (2, 8)}  # (image, patch position): 2 per position
    for i, pos in noisy:
        r, q = divmod(pos, k)
        probs[i, :, 2 * r:2 * r + 2, 3 * q:3 * q + 3] = 1.0 / c
    patches, ent = patch_entropy(probs, k)
    assert patches.shape == (b, k * k, c, 2, 3) and ent.shape == (b, k * k)
    easy, hard = rank_patches(ent)
    for i, pos in noisy:
        assert hard[i, pos] and not easy[i, pos]
    assert (easy.sum(0) == b // 2).all() and (hard.sum(0) == b // 2).all() and not (easy & hard).any()
    # Odd batch: the middle patch of each position is neither; a batch of one has no pair.
    e3, h3 = rank_patches(torch.tensor([[0.1], [0.5], [0.9]]))
    assert e3[:, 0].tolist() == [True, False, False] and h3[:, 0].tolist() == [False, False, True]
    e1, h1 = rank_patches(torch.rand(1, 9))
    assert not e1.any() and not h1.any()


def test_ipsm_gradients_reach_each_player_only():
    """L_D trains D and not the target model; L_ADV trains the target model and not D."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, requires_grad=True)
    disc = PatchDiscriminator(5, 16, width=8)
    out = ipsm_losses(torch.softmax(logits, 1), disc, disc, k=4)
    assert out["disc"].requires_grad and out["adv"].requires_grad
    out["disc"].backward(retain_graph=True)
    assert logits.grad is None and all(p.grad is not None for p in disc.parameters())
    disc.zero_grad(set_to_none=True)
    out["adv"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert 0.0 <= float(out["disc_acc"]) <= 1.0 and out["hard_entropy"] >= out["easy_entropy"]


# ------------------------------------------------------------------------------------------------ the task


def grads(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_one_backward_gives_each_module_its_own_gradient():
    batch = {"image": torch.randint(0, 255, (2, 3, 32, 64), dtype=torch.uint8)}
    # Only L_BNS: the generator learns, the target model and D get nothing.
    task = make_task(tiny_source(), mae_weight=0, dad_weight=0, dad_st_weight=0, tar_weight=0, adv_weight=0,
                     disc_weight=0)
    torch.manual_seed(0)
    task.training_step(batch, 0).loss.backward()
    assert grads(task.generator) > 0 and grads(task.student) == 0 and grads(task.disc) == 0
    assert all(p.grad is None for p in task.source.parameters())
    # Only L_MAE: the generator's gradient is minus the one of minimising L_MAE (it maximises).
    task = make_task(tiny_source(), bns_weight=0, dad_weight=0, dad_st_weight=0, tar_weight=0, adv_weight=0,
                     disc_weight=0, student_gen_bn="joint")
    with torch.no_grad():  # make the target model differ from the source so that L_MAE is not ~0
        task.student.classifier[1].weight.add_(0.05 * torch.randn_like(task.student.classifier[1].weight))
    torch.manual_seed(0)
    task.training_step(batch, 0).loss.backward()
    g_trick = [p.grad.clone() for p in task.generator.parameters()]
    assert grads(task.student) > 0 and grads(task.disc) == 0
    task.generator.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    x = batch["image"].float() / 255
    x_g = task.generator(torch.randn(2, 256))
    logits = task.student(torch.cat([x_g, x]))[:2]
    plain = (logits - task.source(x_g)).abs().mean()
    g_plain = torch.autograd.grad(plain, list(task.generator.parameters()))
    for a, b in zip(g_trick, g_plain):
        assert torch.allclose(a, -b, atol=1e-6, rtol=1e-4)


def test_models_without_batchnorm_are_refused():
    for model in (build_model("tiny", num_classes=19, width=8, norm="gn"),
                  build_model("segformer_b0", num_classes=19)):
        ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=CPU, export="teacher")
        with pytest.raises(ConfigError, match=rf"{model.name}.*needs BatchNorm layers; segformer uses LayerNorm"):
            build(ctx, SFDALiuConfig())


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="method.gen_size"):
        SFDALiuConfig(gen_size=(100, 256)).validate()
    with pytest.raises(ConfigError, match="method.patch_grid"):
        SFDALiuConfig(patch_grid=1).validate()


def test_sample_images_and_png_grid(tmp_path):
    task = make_task(tiny_source(), sample_count=6)
    images = task.sample_images()
    assert images.shape == (6, 3, 32, 64) and images.device.type == "cpu"
    assert torch.equal(images, task.sample_images())  # fixed noise: grids are comparable across steps
    path = save_image_grid(images, tmp_path / "g" / "grid.png", nrow=3)
    assert Image.open(path).size == (3 * 64 + 4 * 2, 2 * 32 + 3 * 2)


def test_recipe_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "source.ckpt"
    save_model(src, tiny_source(), classes=CITYSCAPES19)
    assert "sfda_liu" in RECIPES
    cfg = load_config(AdaptConfig, overrides=[
        "recipe=sfda_liu", f"checkpoint={src}", f"train.out={tmp_path / 'run'}",
        "data.synthetic={size: [32, 64], length: 8}", "data.crop=[32,64]", "data.batch_size=2",
        "data.num_workers=0", "data.val=synthetic:target:val", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", "train.log_every=1", "train.iters=3", "method.gen_width=8",
        "method.gen_size=[32,64]", "method.sample_every=3", "method.sample_count=4"])
    path = run_adapt(cfg)
    model, info = load_model(path)
    assert model.name == "tiny" and info.classes.names == CITYSCAPES19.names
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 3
    for key in ("loss", "loss_bns", "loss_mae", "loss_dad_ss", "loss_dad_st", "loss_tar", "loss_adv", "loss_disc"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert (run / "generated" / "step_000003.png").is_file()
    assert json.loads((run / "eval.json").read_text())["num_images"] == 8
    state = torch.load(run / "state.pt", weights_only=True)
    assert set(state["modules"]) == {"student", "generator", "discriminator"} and "teacher" in state["task"]


def test_running_bn_mode_keeps_generated_images_out_of_the_target_models_statistics():
    batch = {"image": torch.randint(0, 255, (2, 3, 32, 64), dtype=torch.uint8)}
    x = batch["image"].float() / 255
    task = make_task(tiny_source(), student_gen_bn="running")
    bn = [m for m in task.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn:
        m.momentum = None  # cumulative average: after one pass the running stats are that pass's batch stats
        m.reset_running_stats()
    task.training_step(batch, 0).loss.backward()
    assert all(m.training for m in bn)  # eval mode was only for the generated pass
    ref = tiny_source()
    ref_bn = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in ref_bn:
        m.momentum = None
        m.reset_running_stats()
    ref.train()
    with torch.no_grad():
        ref(x)  # the real crops alone
    for a, b in zip(bn, ref_bn):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    # The generated pass still trains the student (L_MAE) and reaches the generator with the reversed sign.
    assert grads(task.student) > 0 and grads(task.generator) > 0


def test_generator_and_discriminator_lr_multipliers_reach_the_optimizer():
    from sfdaseg.config import OptimConfig
    from sfdaseg.engine.trainer import build_param_groups

    task = make_task(tiny_source(), gen_lr_mult=20.0, disc_lr_mult=5.0)
    groups = build_param_groups(task.trainable_modules(), OptimConfig(lr=1e-4, head_lr_mult=2.0))
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["generator/head"] == pytest.approx(1e-4 * 2.0 * 20.0)
    assert lr["discriminator/head"] == pytest.approx(1e-4 * 2.0 * 5.0)
    assert lr["student/backbone"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="method.gen_lr_mult"):
        SFDALiuConfig(gen_lr_mult=0).validate()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_pass_mode_trains_under_ddp(tmp_path, cli_env, python):
    """student_gen_bn=running calls the DDP-wrapped target model twice before the one backward: 2 gloo ranks must
    finish with identical weights (the trainer's replica check)."""
    import subprocess

    src = tmp_path / "source.ckpt"
    save_model(src, tiny_source(), classes=CITYSCAPES19)
    run = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sfdaseg", "adapt",
         "recipe=sfda_liu", f"checkpoint={src}", f"train.out={tmp_path / 'ddp'}", "method.student_gen_bn=running",
         "data.synthetic={size: [32, 64], length: 8}", "data.crop=[32,64]", "data.batch_size=2",
         "data.num_workers=0", "data.val=null", "data.val_extra=[]", "train.device=cpu", "train.progress=false",
         "train.iters=2", "train.ckpt_every=2", "method.gen_width=8", "method.gen_size=[32,64]", "monitor.every=-1",
         "report=false"],
        env=cli_env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replica_max_abs_diff"] for r in records if "replica_max_abs_diff" in r] == [0.0]
