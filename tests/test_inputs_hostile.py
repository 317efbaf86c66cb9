"""Hostile checkpoints, model kwargs and options (issue 10, items 8, 12, 15-19, 23): each gets
one clear error and writes nothing; in_chans and dtypes are honoured; JSON stays JSON."""

import io
import json
import math
import re
import time

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok, run_usage_error, runner, text_of
from heal_inputs import heal_inputs
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eca_surgery import cli
from eca_surgery.checkpoint import save_patched
from eca_surgery.errors import CheckpointError, SurgeryError
from eca_surgery.models import create_model, input_size
from eca_surgery.recipe import load_recipe
from eca_surgery.report import render_scan
from eca_surgery.surgery import convert
from eca_surgery.weights import read_state_dict

SMALL = {"num_classes": 10, "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
SMALL_ARGS = [
    "--model-arg",
    "num_classes=10",
    "--model-arg",
    'pretrained_cfg_overlay={"input_size": [3, 32, 32]}',
]


@pytest.fixture(scope="module")
def state():
    """A seresnet18 (10 classes) state_dict with random parameters and buffers."""
    model = timm.create_model("seresnet18", num_classes=10)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point():  # parameters and buffers, in ranges fp16 can run
                t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else torch.randn_like(t) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


# item 12: a --checkpoint that is not a flat str -> Tensor mapping


def _save(obj):
    return lambda path: torch.save(obj, path)


def _write(data: bytes):
    return lambda path: path.write_bytes(data)


BAD_CHECKPOINTS = {
    "empty.pth": (_write(b""), "not a readable PyTorch file"),
    "text.pth": (_write(b"weights: 1, 2, 3\n"), "not a readable PyTorch file"),
    "list.pth": (_save([torch.zeros(2), torch.ones(2)]), "holds a list of 2 item(s), not a state_dict"),
    "tuple.pth": (_save((1, 2)), "holds a tuple"),
    "tensor.pth": (_save(torch.zeros(3, 4)), "holds a bare tensor of shape (3, 4)"),
    "none.pth": (_save(None), "holds None, not a state_dict"),
    "int.pth": (_save(7), "holds a int"),
    "string.pt": (_save("conv1.weight"), "holds a str"),
    "empty-dict.pth": (_save({}), "holds no tensors"),
    "int-keys.pth": (_save({1: torch.zeros(1), 2: torch.zeros(1)}), "non-string keys"),
    "tuple-keys.bin": (_save({("a", 1): torch.zeros(1)}), "non-string keys"),
    "nested.pth": (_save({"backbone": {"conv1.weight": torch.zeros(1)}}), "not a flat state_dict"),
    "deep-wrapper.pth": (_save({"state_dict": {"model": {"a": torch.zeros(1)}}}), "not a flat state_dict"),
    "wrapper-of-ints.pth": (_save({"state_dict": {"a": 1, "b": 2}}), "not a flat state_dict"),
    "wrapper-not-dict.pth": (_save({"state_dict": [torch.zeros(1)]}), "not a flat state_dict"),
    "empty-wrapper.pth": (_save({"state_dict": {}}), "not a flat state_dict"),
    "mixed-values.pth": (_save({"a": torch.zeros(1), "b": None}), "not a flat state_dict"),
    "prefix-clash.pth": (_save({"module.a": torch.zeros(1), "a": torch.ones(1)}), "twice"),
    "sparse.pth": (_save({"a": torch.eye(3).to_sparse()}), "layout"),
    "complex.pth": (_save({"a": torch.zeros(2, dtype=torch.complex64)}), "complex64"),
    "mixed-dtypes.pth": (
        _save({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2)}),
        "mixes floating dtypes (float16, float32)",
    ),
    "no-tensors.safetensors": (lambda p: save_file({}, str(p)), "holds no tensors"),
    "zero-bytes.safetensors": (_write(b""), "not a readable safetensors file"),
    "text.safetensors": (_write(b"hello world, not weights"), "not a readable safetensors file"),
    "huge-header.safetensors": (_write((2**62).to_bytes(8, "little") + b"{}"), "not a readable safetensors"),
    "folder.pth": (lambda p: p.mkdir(), "is a folder"),
    "folder.safetensors": (lambda p: p.mkdir(), "is a folder"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_gets_one_clear_error(tmp_path, name):
    make, expected = BAD_CHECKPOINTS[name]
    ckpt = tmp_path / name
    make(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        read_state_dict(ckpt)
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out)], tmp_path, out
    )
    assert f"Checkpoint '{ckpt}'" in msg and expected in msg


def test_integer_tensor_where_a_weight_belongs(tmp_path, state):
    ckpt = tmp_path / "int-weight.safetensors"
    save_file({**state, "conv1.weight": state["conv1.weight"].to(torch.int32)}, str(ckpt))
    out = tmp_path / "out.safetensors"
    args = ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out), *SMALL_ARGS]
    assert "conv1.weight (int32)" in run_fail(args, tmp_path, out)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}, "epoch": 3, "args": None},
        lambda s: {"state_dict": {f"_orig_mod.{k}": v for k, v in s.items()}, "optimizer": {"lr": 0.1}},
        lambda s: {"model_ema": s, "model": {}},
    ],
    ids=["ddp", "compiled", "ema"],
)
def test_wrappers_still_unwrap(tmp_path, state, wrap):
    ckpt = tmp_path / "wrapped.pth"
    torch.save(wrap(state), ckpt)
    got = read_state_dict(ckpt)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


# item 16 and model args: an allow-list, typed and bounded values, the same for CLI and metadata

BAD_MODEL_ARGS = {
    "pretrained=true": "'pretrained' is not allowed",
    "pretrained=false": "'pretrained' is not allowed",
    "checkpoint_path=/etc/passwd": "'checkpoint_path' is not allowed",
    "cache_dir=/tmp": "'cache_dir' is not allowed",
    'pretrained_cfg={"file": "/etc/passwd"}': "'pretrained_cfg' is not allowed",
    'pretrained_cfg_overlay={"file": "/etc/passwd"}': "pretrained_cfg_overlay.'file' is not allowed",
    'pretrained_cfg_overlay={"url": "http://example.com/w.pth"}': "pretrained_cfg_overlay.'url' is not allowed",
    'pretrained_cfg_overlay={"hf_hub_id": "timm/resnet18.a1_in1k"}': "'hf_hub_id' is not allowed",
    'pretrained_cfg_overlay={"state_dict": {}}': "'state_dict' is not allowed",
    "pretrained_cfg_overlay=[1]": "pretrained_cfg_overlay is [1]; it must be an object",
    'pretrained_cfg_overlay={"input_size": [3, 100000, 100000]}': "sides 1 to 4096",
    'pretrained_cfg_overlay={"input_size": [100, 32, 32]}': "channels 1 to 64",
    'pretrained_cfg_overlay={"input_size": [3, 32]}': "[channels, height, width]",
    'pretrained_cfg_overlay={"mean": [NaN, 0, 0]}': "finite numbers",
    'pretrained_cfg_overlay={"std": [0, 1, 1]}': "positive numbers",
    'pretrained_cfg_overlay={"crop_pct": Infinity}': "crop_pct is Infinity",
    'pretrained_cfg_overlay={"interpolation": "magic"}': "'bicubic'",
    "drop_rate=NaN": "drop_rate is NaN; it must be a finite number in [0.0, 1.0)",
    "drop_rate=1": "drop_rate is 1",
    "drop_path_rate=-0.1": "drop_path_rate is -0.1",
    "drop_rate=Infinity": "drop_rate is Infinity",
    "drop_rate=fast": 'drop_rate is "fast"',
    "global_pool=sum": "global_pool is \"sum\"; it must be one of '', 'avg'",
    "in_chans=0": "in_chans is 0; it must be an integer from 1 to 64",
    "in_chans=65": "in_chans is 65",
    "in_chans=1.5": "in_chans is 1.5",
    "in_chans=true": "in_chans is true",
    "num_classes=-1": "num_classes is -1",
    "num_classes=1000000000": "num_classes is 1000000000",
    "num_classes=null": "num_classes is null",
    'out_indices=[1, "a"]': 'out_indices is [1, "a"]',
    "img_size=100000": "img_size is 100000",
    "output_stride=7": "output_stride is 7",
    'block_args={"attn_layer": "eca"}': "'block_args' is not allowed",
    "act_layer=gelu": "'act_layer' is not allowed",
}


@pytest.mark.parametrize("arg", list(BAD_MODEL_ARGS))
def test_bad_model_arg_is_refused_before_any_work(tmp_path, arg):
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "--model-arg", arg, "-o", str(out)], tmp_path, out
    )
    assert msg.startswith("Error: --model-arg: model kwarg") and BAD_MODEL_ARGS[arg] in msg


@pytest.mark.parametrize("command", ["inspect", "recipe-check"])
def test_bad_model_arg_in_inspect_and_recipe_check(tmp_path, command):
    args = (
        ["inspect", "seresnet18"]
        if command == "inspect"
        else ["recipe", "check", "se-to-eca", "-m", "seresnet18"]
    )
    msg = run_fail([*args, "--model-arg", "pretrained=true"], tmp_path)
    assert "'pretrained' is not allowed" in msg and "num_classes" in msg


def test_global_pool_without_pooling_needs_no_classifier(tmp_path):
    """global_pool '' is legit with num_classes=0 (a feature map out); with a classifier the
    model cannot run, which is said cleanly before the weights are touched."""
    out = tmp_path / "out.safetensors"
    args = ["convert", "seresnet18", "-r", "se-to-eca", "-o", str(out), "--model-arg", 'global_pool=""']
    msg = run_fail(args, tmp_path, out)
    assert "cannot run on a 1x3x224x224 float32 input" in msg and "num_classes=0" in msg
    report = json.loads(
        run_ok([*args[:-2], "--model-arg", 'global_pool=""', "--model-arg", "num_classes=0", "--json"])
    )
    assert report["check"]["output_shape"][:2] == [1, 512] and len(report["check"]["output_shape"]) == 4


def test_errors_inside_timm_construction_become_surgery_errors(monkeypatch):
    for exc in (KeyError("stem"), AttributeError("no attr"), ZeroDivisionError(), NotImplementedError("x")):

        def broken(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(timm, "create_model", broken)
        with pytest.raises(
            SurgeryError, match=r"timm could not build 'seresnet18' with \{'num_classes': 3\}"
        ):
            create_model("seresnet18", meta=True, num_classes=3)


def test_library_convert_checks_model_kwargs_too():
    with pytest.raises(SurgeryError, match="'checkpoint_path' is not allowed"):
        convert("seresnet18", load_recipe("se-to-eca"), checkpoint_path="/etc/passwd")


@pytest.fixture(scope="module")
def patched_file(tmp_path_factory, state):
    """A small patched seresnet18 (10 classes, 32x32) and its tensors and metadata."""
    root = tmp_path_factory.mktemp("patched")
    source = root / "source.safetensors"
    save_file(state, str(source))
    conv = convert("seresnet18", load_recipe("se-to-eca"), checkpoint=source, **SMALL)
    path = save_patched(
        conv.model, root / "patched.safetensors", conv.plan, model_kwargs=SMALL, source=str(source)
    )
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return path, load_file(path), metadata


BAD_METADATA = {
    "kwargs-list": ({"model_kwargs": "[1]"}, "the model kwargs are list '[1]', not an object"),
    "kwargs-string": ({"model_kwargs": '"abc"'}, "the model kwargs are str 'abc'"),
    "kwargs-null": ({"model_kwargs": "null"}, "the model kwargs are NoneType"),
    "kwargs-number": ({"model_kwargs": "3"}, "the model kwargs are int"),
    "kwargs-not-json": ({"model_kwargs": "{num_classes: 10"}, "damaged eca-surgery metadata"),
    "pretrained": (
        {"model_kwargs": '{"num_classes": 10, "pretrained": true}'},
        "'pretrained' is not allowed",
    ),
    "missing-file": (
        {"model_kwargs": '{"num_classes": 10, "checkpoint_path": "/nonexistent/w.pth"}'},
        "'checkpoint_path' is not allowed",
    ),
    "reads-a-path": (
        {"model_kwargs": '{"num_classes": 10, "pretrained_cfg": {"file": "/etc/passwd"}}'},
        "'pretrained_cfg' is not allowed",
    ),
    "overlay-file": (
        {"model_kwargs": '{"num_classes": 10, "pretrained_cfg_overlay": {"file": "/etc/shadow"}}'},
        "pretrained_cfg_overlay.'file' is not allowed",
    ),
    "input-120GB": (
        {
            "model_kwargs": '{"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 100000, 100000]}}'
        },
        "input_size is [3, 100000, 100000]",
    ),
    "nan-drop": ({"model_kwargs": '{"num_classes": 10, "drop_rate": NaN}'}, "drop_rate is NaN"),
    "huge-classes": ({"model_kwargs": '{"num_classes": 10000000000}'}, "num_classes is 10000000000"),
    "model-local-dir": ({"model": "local-dir:/etc"}, "is not a timm model name"),
    "model-hf-hub": ({"model": "hf-hub:timm/seresnet18.a1_in1k"}, "is not a timm model name"),
    "model-empty": ({"model": ""}, "is not a timm model name"),
    "recipe-list": ({"recipe": "[1]"}, "its recipe is not an object"),
    "no-kwargs": ({"model_kwargs": None}, "damaged eca-surgery metadata"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_verify_refuses_hostile_metadata_up_front(tmp_path, patched_file, case):
    path, tensors, metadata = patched_file
    changes, expected = BAD_METADATA[case]
    bad = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    evil = tmp_path / "evil.safetensors"
    save_file(tensors, str(evil), metadata=bad)
    start = time.perf_counter()
    msg = run_fail(["verify", str(evil)], tmp_path)
    assert time.perf_counter() - start < 10
    assert f"'{evil}'" in msg and expected in msg


def test_verify_refuses_integer_weights_in_a_patched_file(tmp_path, patched_file):
    path, tensors, metadata = patched_file
    evil = tmp_path / "evil.safetensors"
    save_file({**tensors, "fc.weight": tensors["fc.weight"].to(torch.int64)}, str(evil), metadata=metadata)
    assert "fc.weight (int64)" in run_fail(["verify", str(evil)], tmp_path)


# item 15: in_chans


def test_in_chans_is_honoured_by_checks_flops_calibration_and_verify(tmp_path):
    assert input_size(create_model("seresnet18", meta=True, in_chans=1)) == (1, 224, 224)
    inspected = json.loads(
        run_ok(["inspect", "seresnet18", "-r", "se-to-eca", "--model-arg", "in_chans=1", "--json"])
    )
    assert inspected["input_size"] == [1, 224, 224] and inspected["macs_before"] > 0
    text = run_ok(["inspect", "seresnet18", "-r", "se-to-eca", "--model-arg", "in_chans=1"])
    assert "GMACs at 1x224x224" in " ".join(text.split())
    out = tmp_path / "gray.safetensors"
    args = [
        "convert",
        "seresnet18",
        "-r",
        "se-to-eca",
        "-o",
        str(out),
        "--init",
        "fit-se",
        "--calib-size",
        "4",
    ]
    report = json.loads(run_ok([*args, "--model-arg", "in_chans=1", *SMALL_ARGS, "--json"]))
    assert report["check"]["input_shape"] == [1, 1, 32, 32] and report["macs_before"] > 0
    assert "1x32x32" in report["init"]["calibration"]
    verified = json.loads(run_ok(["verify", str(out), "--json"]))
    assert verified["check"]["input_shape"] == [1, 1, 32, 32] and verified["check"]["output_shape"] == [1, 10]


def test_inspect_says_why_gmacs_are_missing(tmp_path):
    args = ["inspect", "seresnet18", "-r", "se-to-eca", "--model-arg", 'global_pool=""']
    text = " ".join(run_ok(args).split())
    assert "GMACs: not counted; the model could not run on a 1x3x224x224 input" in text
    assert "could not run" in json.loads(run_ok([*args, "--json"]))["macs_error"]


# item 23: fp16, bf16 and fp64 checkpoints keep their dtype, and every check runs in it


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_half_bf16_and_double_checkpoints_convert_check_and_verify(tmp_path, state, dtype):
    dt = getattr(torch, dtype)
    ckpt = tmp_path / f"{dtype}.safetensors"
    save_file({k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}, str(ckpt))
    for init in ("default", "fit-se"):
        out = tmp_path / f"{init}.safetensors"
        args = ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out), *SMALL_ARGS]
        report = json.loads(run_ok([*args, "--init", init, "--calib-size", "4", "--json"]))
        assert report["dtype"] == dtype and report["check"]["dtype"] == dtype and report["check"]["finite"]
        assert {v.dtype for v in load_file(out).values() if v.is_floating_point()} == {dt}
        verified = json.loads(run_ok(["verify", str(out), "--json"]))
        assert verified["dtype"] == dtype and verified["check"]["finite"]
    text = " ".join(run_ok(["verify", str(out)]).split())
    assert f"dtype: {dtype}" in text


def test_readme_says_the_model_keeps_the_file_dtype():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "keeps the dtype of the file" in readme


# item 17: heal's options, a non-finite loss, strict JSON


@pytest.fixture(scope="module")
def heal_setup(tmp_path_factory, state):
    return heal_inputs(tmp_path_factory.mktemp("heal"), SMALL, 8, randomise=False)


def _heal(root, patched, teacher, out, *extra):
    return ["heal", str(patched), "--data", str(root / "images"), "-o", str(out), "--teacher-checkpoint",
            str(teacher), "--batch-size", "4", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--lr", "0"], "--lr must be a positive finite number"),
        (["--temperature", "inf"], "--temperature must be a positive finite number"),
    ],
)
def test_heal_refuses_bad_numbers_before_any_work(heal_setup, tmp_path, option, expected):
    out = tmp_path / "healed.safetensors"
    assert expected in run_fail(_heal(*heal_setup, out, "--steps", "2", *option), tmp_path, out)


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--workers", "-1"], "greater than or equal to 0"),
        (["--workers", "100000"], "less than or equal to 256"),
        (["--save-every", "-1"], "greater than or equal to 0"),
        (["--steps", "0"], "greater than or equal to 1"),
        (["--lr", "-1"], "greater than or equal to 0"),
        (["--lr", "nan"], "greater than or equal to 0"),
        (["--feature-weight", "nan"], "greater than or equal to 0"),
    ],
)
def test_heal_refuses_numbers_out_of_bounds_as_usage_errors(heal_setup, tmp_path, option, expected):
    out = tmp_path / "healed.safetensors"
    msg = run_usage_error(_heal(*heal_setup, out, "--steps", "2", *option), tmp_path)
    assert f"Invalid value for '{option[0]}'" in msg and expected in msg


def test_heal_with_a_huge_lr_stops_and_writes_nothing(heal_setup, tmp_path):
    out = tmp_path / "healed.safetensors"
    msg = run_fail(_heal(*heal_setup, out, "--steps", "6", "--lr", "1e30", "--json"), tmp_path, out)
    assert "Healing diverged at step" in msg and "was not saved" in msg and "Nothing was written" in msg


def test_a_non_finite_loss_keeps_the_last_good_state_resumable(heal_setup, tmp_path, monkeypatch):
    from eca_surgery import healing as heal_module

    root, patched, teacher = heal_setup
    out = tmp_path / "healed.safetensors"
    real, calls = heal_module.distillation_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(heal_module, "distillation_loss", poisoned)
    args = _heal(root, patched, teacher, out, "--steps", "4", "--save-every", "2", "--train", "eca")
    msg = " ".join(text_of(runner.invoke(cli.app, args)).split())
    assert "Healing diverged at step 3: the loss is nan" in msg and "from step 2" in msg and "--resume" in msg
    saved = load_file(out)
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["heal"])["step"] == 2
    monkeypatch.setattr(heal_module, "distillation_loss", real)
    report = json.loads(run_ok([*args, "--resume", "--json"]))
    assert report["resumed_from_step"] == 2 and report["steps"] == 4


def test_json_output_is_strict_json_even_with_nan(capsys):
    cli._print_json({"loss_last": float("nan"), "x": [float("inf"), 1.5], "y": {"z": -math.inf}, "n": 3})
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert data == {"loss_last": None, "x": [None, 1.5], "y": {"z": None}, "n": 3}


# items 18 and 19: scan counts with --limit, and numbers never cut at 80 columns


def test_scan_limit_limits_rows_not_counts():
    full = json.loads(run_ok(["scan", "seresnet1*", "--no-flops", "--json"]))
    limited = json.loads(run_ok(["scan", "seresnet1*", "--no-flops", "--limit", "2", "--json"]))
    assert full["with_se"] > 2 and limited["with_se"] == full["with_se"] and limited["shown"] == 2
    assert limited["scanned"] == full["scanned"] and len(limited["models"]) == 2
    text = " ".join(run_ok(["scan", "seresnet1*", "--no-flops", "--limit", "2"]).split())
    assert f"Scanned {full['scanned']} models: {full['with_se']} with SE blocks (2 listed)" in text


def _numbers(row):
    return [
        f"{row['params_before'] / 1e6:.2f}",
        f"{row['saving'] / 1e6:.3f}",
        f"{row['saving_pct']:.1f}",
        f"{row['macs_before'] / 1e9:.3f}",
    ]


@pytest.mark.parametrize("width", [80, 64, 120])
def test_scan_numbers_are_never_cut(width):
    rows = [
        {"model": name, "se_blocks": {"SEModule": 89}, "params_before": before, "params_after": before - saving,
         "macs_before": macs, "macs_after": macs - 1_000_000, "unknown_se_like": [], "saving": saving,
         "saving_pct": 100 * saving / before}
        for name, before, saving, macs in [
            ("seresnextaa201d_32x8d", 149_390_000, 7_688_000, 113_712_000_000),
            ("seresnet269d", 113_670_000, 11_580_000, 26_485_000_000),
        ]
    ]  # fmt: skip
    report = {
        "scanned": 21,
        "with_se": 21,
        "without_se": 0,
        "failed": 0,
        "shown": 2,
        "models": rows,
        "failures": {},
    }
    console = Console(width=width, file=io.StringIO(), color_system=None)
    render_scan(console, report)
    text = console.file.getvalue()
    assert "…" not in text and all(len(line) <= width for line in text.splitlines())
    for row in rows:
        assert all(number in text for number in _numbers(row)), text


def test_scan_cli_at_80_columns_cuts_no_number():
    report = json.loads(run_ok(["scan", "seresnet1*", "--json"]))
    text = run_ok(["scan", "seresnet1*"])
    assert "…" not in text
    for row in report["models"]:
        assert all(number in text for number in _numbers(row)), text


def test_rgb_calibration_images_for_a_one_channel_model_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    out = tmp_path / "out.safetensors"
    args = [
        "convert",
        "seresnet18",
        "-r",
        "se-to-eca",
        "-o",
        str(out),
        "--init",
        "fit-se",
        "--model-arg",
        "in_chans=1",
    ]
    msg = run_fail([*args, "--calib-data", str(tmp_path / "images")], tmp_path, out)
    assert "read as RGB" in msg and "1 channel(s)" in msg
