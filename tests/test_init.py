"""Fitted (fit-se) and identity initialisation of new ECA blocks, and calibration data."""

import copy
import json

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok, run_usage_error
from PIL import Image
from randomised import randomise_
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import EcaModule, SEModule
from torch import nn

from eca_surgery import load_patched
from eca_surgery.apply import apply_plan
from eca_surgery.data import calibration_batches, epoch_batches, image_files
from eca_surgery.eca import make_eca
from eca_surgery.init import fittable, record_se, set_fitted
from eca_surgery.plan import make_plan
from eca_surgery.recipe import load_recipe, parse_recipe

SMALL = {"num_classes": 10, "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}


def exact_se(channels: int, kernel: torch.Tensor, gate: str) -> SEModule:
    """An SE block whose pre-gate output is exactly ``conv1d(pooled, kernel)``: an identity
    first layer, no activation, and the kernel's band matrix as second layer."""
    se = SEModule(channels, rd_ratio=1.0, act_layer=nn.Identity, gate_layer=gate)
    k = len(kernel)
    band = torch.zeros(channels, channels)
    for c in range(channels):
        for j in range(k):
            if 0 <= c + j - k // 2 < channels:
                band[c, c + j - k // 2] = kernel[j]
    with torch.no_grad():
        se.fc1.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        se.fc2.weight.copy_(band.view(channels, channels, 1, 1))
        se.fc1.bias.zero_()
        se.fc2.bias.zero_()
    return se


@pytest.mark.parametrize("gate, eca_gate", [("sigmoid", "sigmoid"), ("hard_sigmoid", "keep")])
def test_fit_se_recovers_an_exact_eca_solution(gate, eca_gate):
    model = timm.create_model("seresnet18", zero_init_last=False).eval()
    kernel = torch.tensor([0.3, -1.2, 0.7, 0.25, -0.5])  # k = 5 is the rule's size for 128 channels
    model.layer2[1].se = exact_se(128, kernel, gate)
    recipe = parse_recipe(
        f"version: 1\nrules:\n  - action: replace\n    select: {{se: true}}\n    eca: {{gate: {eca_gate}}}"
    )
    kept = copy.deepcopy(model.layer2[1].se).eval()  # the SE block, apart from the model
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    plan = make_plan(model, recipe, "seresnet18")
    edits = fittable(model, plan)
    assert len(edits) == 8
    problems, targets, _ = record_se(model, edits, list(torch.randn(8, 3, 64, 64).split(4)))
    apply_plan(model, plan)
    fits = {f.path: f for f in set_fitted(model, edits, problems, targets)}

    got = model.layer2[1].se.conv.weight.flatten()
    assert torch.allclose(got, kernel, atol=1e-5), got
    assert fits["layer2.1.se"].rel_error < 1e-5 and fits["layer2.1.se"].r2 > 1 - 1e-9
    assert targets["layer2.1.se"] == "pre-gate output"
    # the fitted ECA block in the model now computes what the SE block kept apart computed
    eca = model.layer2[1].se
    assert isinstance(eca, EcaModule) and eca is not kept
    inner = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(inner, kept(inner), atol=1e-3)  # the SE does change its input
        torch.testing.assert_close(eca(inner), kept(inner), atol=1e-5, rtol=1e-5)
    assert expected.shape == (4, 1000)


def neighbours(y: torch.Tensor, k: int) -> torch.Tensor:
    """The least-squares design matrix, built here apart from eca_surgery.init: row (n, c) holds
    ``y[n, c - k//2 .. c + k//2]``, zero beyond the first and last channel (a 'same' conv1d)."""
    n, c = y.shape
    a = torch.zeros(n, c, k, dtype=torch.float64)
    for j in range(k):
        src = torch.arange(c) + j - k // 2
        inside = (src >= 0) & (src < c)
        a[:, inside, j] = y[:, src[inside]].double()
    return a.reshape(n * c, k)


def independent_fit(se: nn.Module, inputs: list[torch.Tensor], k: int, logit: bool):
    """Kernel, relative residual and R^2 of ``conv1d(pooled, w) ~ target`` by torch.linalg.lstsq in
    float64, the target being the SE's pre-gate output (``logit``: the logit of its gate output,
    clamped to [0.01, 0.99] as a saturated hard sigmoid needs)."""
    seen = []
    hook = se.gate.register_forward_hook(lambda m, a, o: seen.append(o if logit else a[0]))
    with torch.no_grad():
        for x in inputs:
            se(x)
    hook.remove()
    y = torch.cat([x.double().mean((2, 3)) for x in inputs])
    z = torch.cat([t.double().flatten(1) for t in seen])
    if logit:
        z = torch.logit(z.clamp(0.01, 0.99))
    a, z = neighbours(y, k), z.reshape(-1)
    w = torch.linalg.lstsq(a, z[:, None], driver="gelsd").solution[:, 0]
    residual = a @ w - z
    r2 = 1 - residual.square().sum() / (z - z.mean()).square().sum()
    return w, float(residual.norm() / z.norm()), float(r2)


@pytest.mark.parametrize("name, logit", [("seresnet18", False), ("mobilenetv3_small_050", True)])
def test_fit_se_equals_an_independent_least_squares_solution(name, logit):
    """On a model whose weights and buffers are all random, each fitted kernel is the least-squares
    solution computed here from the SE blocks' recorded inputs and a copy of each SE block."""
    model = randomise_(timm.create_model(name, num_classes=10)).eval()
    plan = make_plan(model, load_recipe("se-to-eca"), name)
    edits = fittable(model, plan)
    assert edits and {e.gate for e in edits} == {"sigmoid"}
    kept = {e.path: copy.deepcopy(model.get_submodule(e.path)) for e in edits}  # apart from the model
    inputs: dict[str, list[torch.Tensor]] = {e.path: [] for e in edits}
    hooks = [
        model.get_submodule(e.path).register_forward_pre_hook(lambda m, a, p=e.path: inputs[p].append(a[0]))
        for e in edits
    ]
    batches = list(torch.randn(12, 3, 64, 64).split(5))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()

    problems, targets, _ = record_se(model, edits, batches)
    apply_plan(model, plan)
    fits = {f.path: f for f in set_fitted(model, edits, problems, targets)}
    for edit in edits:
        w, rel, r2 = independent_fit(kept[edit.path], inputs[edit.path], edit.kernel_size, logit)
        eca = model.get_submodule(edit.eca_path)
        assert isinstance(eca, EcaModule), edit.eca_path
        got = eca.conv.weight.detach().double().flatten()
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=edit.path)
        fit = fits[edit.path]
        assert fit.samples == 12 and fit.kernel_size == len(w)
        assert fit.rel_error == pytest.approx(rel, rel=1e-6, abs=1e-9) and fit.rel_error < 1 - 1e-3
        assert fit.r2 == pytest.approx(r2, rel=1e-6, abs=1e-9)
        assert targets[edit.path] == (
            "sigmoid inverse of the SE gate's output" if logit else "pre-gate output"
        )
    # the fitted kernels follow the SE blocks kept apart more closely than PyTorch's default ones
    fitted_err = default_err = 0.0
    for edit in edits:
        x = torch.cat(inputs[edit.path])
        default = make_eca(edit.channels, kernel_size=edit.kernel_size, gate=edit.gate)
        with torch.no_grad():
            se_out = kept[edit.path](x)
            fitted_err += float((model.get_submodule(edit.eca_path)(x) - se_out).norm())
            default_err += float((default(x) - se_out).norm())
    assert fitted_err < default_err


def test_least_squares_never_worse_than_a_zero_kernel():
    model = randomise_(timm.create_model("seresnet18")).eval()
    plan = make_plan(model, load_recipe("se-to-eca"), "seresnet18")
    edits = fittable(model, plan)
    problems, targets, _ = record_se(model, edits, [torch.randn(4, 3, 64, 64)])
    apply_plan(model, plan)
    for fit in set_fitted(model, edits, problems, targets):
        assert 0 <= fit.rel_error < 1 and fit.samples == 4  # a zero kernel's relative error is 1


@pytest.fixture(scope="module")
def small_se(tmp_path_factory):
    """Checkpoints of models with random parameters and buffers, and an image folder
    (two class folders, one level deeper for some, PNG and JPEG, and a text file to skip)."""
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    model = randomise_(timm.create_model("seresnet18", **SMALL), seed=1)
    save_file(model.state_dict(), root / "se.safetensors")
    plain = randomise_(timm.create_model("resnet18", **SMALL), seed=2)
    save_file(plain.state_dict(), root / "plain.safetensors")
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        folder = root / "images" / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(40, 48, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "images" / "notes.txt").write_text("not an image")
    return root


def test_convert_fit_se_reports_fits_and_fidelity(small_se, tmp_path):
    out = tmp_path / "fit.safetensors"
    args = ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(small_se / "se.safetensors")]
    args += ["--model-arg", "num_classes=10", "--model-arg", "zero_init_last=false"]
    args += ["--model-arg", 'pretrained_cfg_overlay={"input_size": [3, 32, 32]}']
    args += ["--init", "fit-se", "--calib-data", str(small_se / "images"), "-o", str(out), "--json"]
    report = json.loads(run_ok(args))
    init = report["init"]
    assert init["method"] == "fit-se" and init["calibration"].endswith("at 3x32x32")
    assert init["calibration"].startswith("10 images from")
    assert [b["path"] for b in init["blocks"]] == [e["path"] for e in report["edits"]]
    for b in init["blocks"]:
        assert 0 <= b["rel_error"] < 1 and b["samples"] == 10 and b["target"] == "pre-gate output"
    for key in ("fidelity", "fidelity_default"):
        assert init[key]["samples"] == 10 and -1 <= init[key]["cosine"] <= 1 + 1e-6
        assert 0 <= init[key]["top1_agreement"] <= 1
    # the fit follows the original model more closely than PyTorch's default kernels do
    fitted, default = init["fidelity"], init["fidelity_default"]
    assert fitted["cosine"] > default["cosine"] and fitted["max_abs_diff"] < default["max_abs_diff"]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["init"])["blocks"] == init["blocks"]
        assert json.loads(f.metadata()["model_kwargs"]) == SMALL
        kernel = f.get_tensor("layer1.0.se.conv.weight")
    # the saved kernels are the fitted ones, and the file rebuilds the same model
    assert load_patched(out).layer1[0].se.conv.weight.flatten().tolist() == kernel.flatten().tolist()
    # every kernel in the file is the one the Python API fits from the same images
    from eca_surgery.surgery import convert

    api = convert(
        "seresnet18",
        load_recipe("se-to-eca"),
        checkpoint=small_se / "se.safetensors",
        init="fit-se",
        calib_data=small_se / "images",
        **SMALL,
    )
    saved, state = load_file(out), api.model.state_dict()
    kernels = [k for k in saved if k.endswith(".se.conv.weight")]
    assert len(kernels) == 8 and all(torch.equal(saved[k], state[k]) for k in kernels)
    assert all(saved[k].abs().max() > 0 for k in kernels)
    assert [b["rel_error"] for b in api.init["blocks"]] == [b["rel_error"] for b in init["blocks"]]


def test_fit_se_is_deterministic_and_seeded_synthetic(small_se):
    from eca_surgery.surgery import convert

    recipe = load_recipe("se-to-eca")
    runs = [
        convert(
            "seresnet18", recipe, checkpoint=small_se / "se.safetensors", init="fit-se", calib_size=6, **SMALL
        )
        for _ in range(2)
    ]
    assert runs[0].init == runs[1].init
    assert runs[0].init["calibration"].startswith("synthetic: 6 Gaussian-noise inputs of 3x32x32")
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_identity_init_keeps_the_original_function_exactly(small_se, tmp_path):
    from eca_surgery.checkpoint import save_patched
    from eca_surgery.surgery import convert

    original = timm.create_model("resnet18", **SMALL).eval()
    original.load_state_dict(load_file(small_se / "plain.safetensors"))
    conv = convert(
        "resnet18",
        load_recipe("eca-after-stages"),
        checkpoint=small_se / "plain.safetensors",
        init="identity",
        calib_data=small_se / "images",
        **SMALL,
    )
    assert conv.init["fidelity"]["max_abs_diff"] == 0 and conv.init["fidelity"]["top1_agreement"] == 1
    assert {e.gate for e in conv.plan.edits} == {"double_sigmoid"}
    assert conv.plan.params_after - conv.plan.params_before == 15  # k = 5, 5, 5
    path = save_patched(
        conv.model, tmp_path / "id.safetensors", conv.plan, model_kwargs=conv.model_kwargs, init=conv.init
    )
    patched = load_patched(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(x), original(x))
    default = convert(
        "resnet18", load_recipe("eca-after-stages"), checkpoint=small_se / "plain.safetensors", **SMALL
    )
    with torch.no_grad():
        assert not torch.allclose(default.model(x), original(x))  # the paper's gate halves every channel


def test_init_errors(small_se, tmp_path):
    se = ["-c", str(small_se / "se.safetensors"), "-o", str(tmp_path / "o.safetensors")]
    msg = run_fail(
        [
            "convert",
            "resnet18",
            "-r",
            "eca-after-stages",
            "--init",
            "fit-se",
            "-o",
            str(tmp_path / "o.safetensors"),
        ],
        tmp_path,
    )
    assert "replaces no SE block" in msg and "--init identity" in msg
    msg = run_fail(
        [
            "convert",
            "seresnet18",
            "-r",
            "se-to-eca",
            "--init",
            "identity",
            "-o",
            str(tmp_path / "o.safetensors"),
        ],
        tmp_path,
    )
    assert "inserts none" in msg and "--init fit-se" in msg
    msg = run_fail(["convert", "seresnet18", "-r", "se-to-eca", "--model-arg", "classes"] + se, tmp_path)
    assert "--model-arg 'classes' is not KEY=VALUE" in msg
    msg = run_usage_error(["convert", "seresnet18", "-r", "se-to-eca", "--init", "fitted"] + se, tmp_path)
    assert "--init" in msg and "'fitted' is not one of 'default', 'fit-se', 'identity'" in msg
    msg = run_fail(["convert", "seresnet18", "-r", "se-to-eca", "--calib-data", str(tmp_path)] + se, tmp_path)
    assert "--calib-data is used by --init fit-se" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "--init", "fit-se", "--calib-data", str(empty)] + se,
        tmp_path,
    )
    assert "holds no images" in msg


def test_image_folder_discovery_and_batches(small_se, tmp_path):
    files = image_files(small_se / "images")
    assert len(files) == 10 and {f.suffix for f in files} == {".png", ".jpg"}
    model = timm.create_model("resnet18", **SMALL)
    batches, described = calibration_batches(model, small_se / "images", count=7, batch_size=3, seed=1)
    assert [b.shape[0] for b in batches] == [3, 3, 1] and batches[0].shape[1:] == (3, 32, 32)
    assert "7 images" in described
    # every image of an epoch once, the same order for the same seed and epoch, per-rank shares
    assert sorted(sum(epoch_batches(10, 5, 0, 0), [])) == list(range(10))
    assert epoch_batches(10, 4, 0, 3) == epoch_batches(10, 4, 0, 3) != epoch_batches(10, 4, 0, 4)
    r0, r1 = epoch_batches(10, 2, 0, 0, 0, 2), epoch_batches(10, 2, 0, 0, 1, 2)
    assert sorted(sum(r0 + r1, [])) == sorted(sum(epoch_batches(10, 4, 0, 0), []))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    from eca_surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="bad.png' cannot be read"):
        calibration_batches(model, tmp_path, count=4)
