"""What a user or a reviewer trying to break the library meets: inference mode, targets, training mode, state
dicts after folding, parameters changed mid-explanation, bounds on the device, the command line's bad inputs, the
package layout and the plotting backend (issue 14)."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp import rules


def small_cnn(batchnorm=True, dropout=0.0):
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4) if batchnorm else torch.nn.Identity(),
              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(dropout),
              torch.nn.Linear(4, 3)]
    model = torch.nn.Sequential(*layers).double()
    if batchnorm:
        layers[1].running_mean.uniform_(-0.5, 0.5)
        layers[1].running_var.uniform_(0.5, 2.0)
    return model


# -- inference mode
def test_explain_works_under_inference_mode_and_on_inference_tensors():
    model = lrp.convert(small_cnn().eval())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = lrp.explain(model, x, target=1)
    with torch.inference_mode():
        inside = lrp.explain(model, x, target=1)
        made_inside = torch.randn(2, 3, 6, 6, dtype=torch.float64).copy_(x)
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(lrp.explain(model, made_inside, target=1), expected)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        with lrp.rules_applied(model, "epsilon"):
            pass


# -- targets
@pytest.mark.parametrize("make", [lambda: 2, lambda: np.int64(2), lambda: torch.tensor(2), lambda: np.array(2)],
                         ids=["int", "numpy", "tensor", "array"])
def test_scalar_targets_mean_one_class_for_all(make):
    model = lrp.convert(small_cnn().eval())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(lrp.explain(model, x, target=make()), lrp.explain(model, x, target=[2, 2, 2, 2]))


def test_argmax_of_the_logits_is_a_target_and_strings_are_value_errors():
    model = lrp.convert(small_cnn().eval())
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    top = model(x).argmax()
    torch.testing.assert_close(lrp.explain(model, x, target=top), lrp.explain(model, x))
    for bad in ("3", b"3", object(), 2.0, torch.tensor([True])):
        with pytest.raises(ValueError, match="target"):
            lrp.explain(model, x, target=bad)


# -- training mode
def test_training_mode_warns_at_convert_and_raises_at_explain_on_both_paths():
    model = small_cnn(dropout=0.5)  # training mode
    with pytest.warns(UserWarning, match="training mode"):
        converted = lrp.convert(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"training mode \('5'\).*model.eval\(\)"):  # '1' was folded
        lrp.explain(converted, x)
    sequential = lrp.Sequential(lrp.Linear(4, 3), torch.nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match="training mode"):
        sequential(torch.randn(2, 4, dtype=torch.float64), explain=True)
    converted.eval()
    a, b = lrp.explain(converted, x), lrp.explain(converted, x)
    assert torch.equal(a, b)


def test_modules_whose_output_ignores_the_mode_may_stay_in_training_mode():
    model = lrp.Sequential(lrp.Linear(4, 3), torch.nn.ReLU(), torch.nn.Dropout(0.0), lrp.Linear(3, 2)).double()
    assert model.training
    relevance = lrp.explain(model, torch.randn(2, 4, dtype=torch.float64))
    assert torch.isfinite(relevance).all()


# -- state dicts after folding
def test_state_dict_of_the_unconverted_model_is_refused_before_anything_changes():
    original = small_cnn().eval()
    converted = lrp.convert(original)
    before = {key: value.clone() for key, value in converted.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match="folded into layer '0'.*nothing was loaded"):
            converted.load_state_dict(original.state_dict(), strict=strict)
    after = converted.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    converted.load_state_dict(before)  # its own state dict loads
    clone = pickle.loads(pickle.dumps(converted))  # the guard pickles with the model
    with pytest.raises(ValueError, match="folded"):
        clone.load_state_dict(original.state_dict())
    resnet = lrp.convert(torchvision.models.resnet18(num_classes=5).eval())
    with pytest.raises(ValueError, match="'bn1'"):
        resnet.load_state_dict(torchvision.models.resnet18(num_classes=5).state_dict())


# -- parameters changed between forward and backward
def test_weights_changed_in_place_between_forward_and_backward_raise():
    model = lrp.Sequential(lrp.Linear(4, 3), torch.nn.ReLU(), lrp.Linear(3, 2)).double().eval()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    output = model(x, explain=True)
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        output[:, 0].sum().backward()
    output = model(x, explain=True)
    output[:, 0].sum().backward()  # a fresh forward uses the new weights
    assert torch.isfinite(x.grad).all()


def test_layer_output_changed_in_place_by_user_code_raises_a_torchlrp_error():
    class Inplace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = lrp.Linear(4, 3), lrp.Linear(3, 2)

        def forward(self, x):
            hidden = self.layer(x)
            hidden.mul_(2.0)  # modifies what the layer keeps for its relevance
            return self.head(hidden)

    model = Inplace().double().eval()
    with pytest.raises(RuntimeError, match="torchlrp: a tensor that a Epsilon layer kept.*out of place"):
        lrp.explain(model, torch.randn(2, 4, dtype=torch.float64))


# -- z^B bounds
def test_zbox_bounds_are_placed_once_and_kept(monkeypatch, device):
    low, high = torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0)  # float32 on the CPU, as imagenet.bounds()
    rule = lrp.EpsilonGammaBox(low, high)
    model = lrp.convert(small_cnn().eval()).to(device)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device)
    placed = []
    original = torch.as_tensor

    def counting(data, *args, **kwargs):
        if data is low or data is high:
            placed.append(data)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", counting)
    first = lrp.explain(model, x, rule=rule)
    assert len(placed) == 2  # low and high, once each, for forward and backward together
    second = lrp.explain(model, x, rule=rule)
    assert len(placed) == 2 and torch.equal(first, second)
    low.fill_(-3.0)  # a changed bound is placed again (the other one is kept)
    lrp.explain(model, x, rule=rule)
    assert len(placed) == 3 and placed[-1] is low


# -- the command line
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchlrp.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture
def picture(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and lines[0].startswith("torchlrp: error:")


def test_cli_refuses_an_image_over_the_decompression_limit(tmp_path, picture):
    from torchlrp import cli, imagenet
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 100
        with pytest.raises(ValueError, match="larger than Pillow's limit"):
            imagenet.load_image(str(picture))
        assert cli.main(["explain", str(picture), "--random-weights", "--model", "resnet18",
                         "--out", str(tmp_path / "out")]) == 2
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("kind", ["other architecture", "pickled model", "not torch"])
def test_cli_refuses_weights_that_are_not_this_models_state_dict(tmp_path, picture, kind):
    weights = tmp_path / "weights.pth"
    if kind == "other architecture":
        torch.save(torchvision.models.alexnet().state_dict(), weights)
    elif kind == "pickled model":
        torch.save(torchvision.models.resnet18(), weights)
    else:
        weights.write_bytes(b"garbage")
    result = run_cli("explain", str(picture), "--model", "resnet18", "--weights", str(weights),
                     "--out", str(tmp_path / "out"))
    assert one_line_error(result), result.stderr
    assert "state_dict" in result.stderr


@pytest.mark.parametrize("size, message", [("0", "--size must be a side length of 1..4096"), ("8", "--size too small")])
def test_cli_refuses_sizes_the_model_cannot_take(tmp_path, picture, size, message):
    result = run_cli("explain", str(picture), "--model", "alexnet", "--random-weights", "--size", size,
                     "--out", str(tmp_path / "out"))
    assert one_line_error(result) and message in result.stderr, result.stderr


def test_cli_never_overwrites_and_names_outputs_by_model_and_rule(tmp_path, picture):
    existing = tmp_path / "taken"
    existing.write_text("mine")
    result = run_cli("explain", str(picture), "--random-weights", "--model", "resnet18", "--out", str(existing))
    assert one_line_error(result) and "existing file" in result.stderr
    assert existing.read_text() == "mine"
    out = tmp_path / "out"
    result = run_cli("explain", str(picture), "--random-weights", "--model", "resnet18", "--size", "64",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = out / "x_resnet18_epsilon-gamma-box.png"
    assert written.is_file() and "random weights" in result.stdout
    stamp = written.stat().st_mtime_ns
    result = run_cli("explain", str(picture), "--random-weights", "--model", "resnet18", "--size", "64",
                     "--out", str(out))
    assert one_line_error(result) and "not overwritten" in result.stderr and written.stat().st_mtime_ns == stamp
    single = tmp_path / "chosen.png"
    result = run_cli("explain", str(picture), "--random-weights", "--model", "resnet18", "--size", "64",
                     "--out", str(single))
    assert result.returncode == 0 and single.is_file()


def test_cli_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"torchlrp {lrp.__version__}"


# -- the package folder
def test_a_folder_named_torchlrp_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    clone = tmp_path / "torchlrp"  # what `git clone` names the repository's folder
    clone.mkdir()
    (clone / "README.md").write_text("a clone's root")
    result = subprocess.run([sys.executable, "-c", "import torchlrp; print(torchlrp.Sequential.__name__)"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "Sequential", result.stderr


# -- the plotting backend
def test_save_grid_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        lrp.image.save_grid(str(tmp_path / "grid.png"), [[np.zeros((4, 4, 3))]])
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "grid.png").is_file()
    finally:
        matplotlib.use(backend)


# -- mixed precision
AUTOCAST_TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.08}  # relative L2, against float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_rule_explains_under_autocast(dtype, device):
    """A forward under torch.autocast (AMP's pattern) explains with every rule, close to the float32 result."""
    torch.manual_seed(0)
    model = lrp.Sequential(lrp.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), lrp.Conv2d(8, 8, 3, stride=2),
                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                           lrp.Linear(32, 5)).eval().to(device)
    x = torch.rand(4, 3, 12, 12, device=device)
    data = [torch.rand(32, 3, 12, 12, device=device) for _ in range(4)]
    patterns = lrp.patterns.fit_patternnet(model, data)
    with torch.autocast(device.type, dtype=dtype):
        fitted = lrp.patterns.fit_patternnet(model, data)  # fits under autocast too
    for name in patterns.names:  # statistics of lower-precision activations, kept in float32 (the estimate itself is
        # ill-conditioned on a random model: its digits differ, see the float32 patterns used below)
        assert fitted[name].shape == patterns[name].shape and fitted[name].dtype == torch.float32
        assert torch.isfinite(fitted[name]).all()
    for name in rules.rule_names():
        extra = {"pattern": patterns} if name.startswith("pattern") else {}
        expected = lrp.explain(model, x, target=1, rule=name, **extra)
        with torch.autocast(device.type, dtype=dtype):
            relevance = lrp.explain(model, x, target=1, rule=name, **extra)
        assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all(), name
        error = float((relevance - expected).norm() / expected.norm())
        assert error < AUTOCAST_TOLERANCE[dtype], (name, error)


def test_composites_on_converted_cnn_families_under_autocast(device):
    """Converted models (folded batch norms, residual sums, gates, layer norms) explain under bfloat16 autocast about
    as closely as the plain gradient itself follows its float32 value (random models are ill-conditioned)."""
    torch.manual_seed(0)
    low, high = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    for name in ("resnet18", "convnext_tiny"):
        model = lrp.convert(getattr(torchvision.models, name)(num_classes=10).eval()).to(device)
        x = torch.rand(2, 3, 64, 64, device=device)
        deviation = {}
        for key, rule in (("gradient", "gradient"), ("epsilon-plus", lrp.EpsilonPlus()),
                          ("epsilon-gamma-box", lrp.EpsilonGammaBox(low, high))):
            expected = lrp.explain(model, x, target=1, rule=rule)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                relevance = lrp.explain(model, x, target=1, rule=rule)
            assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all()
            deviation[key] = float((relevance - expected).norm() / expected.norm())
        assert max(deviation.values()) <= 1.5 * deviation["gradient"] + 0.05, (name, deviation)


@pytest.mark.parametrize("relu", [torch.nn.ReLU, lrp.ReLU], ids=["torch", "torchlrp"])
def test_inplace_relus_after_layers_that_keep_their_output(relu):
    """In explain mode an in-place module gets a copy of what a layer keeps (its output), so relevance is that of
    the out-of-place model; a torchlrp ReLU after a layer that folded it passes the tensor on untouched."""
    torch.manual_seed(0)
    inplace = lrp.Sequential(lrp.Conv2d(2, 4, 3), relu(inplace=True), torch.nn.Flatten(), lrp.Linear(64, 3),
                             relu(inplace=True), lrp.Linear(3, 2)).double().eval()
    plain = lrp.Sequential(lrp.Conv2d(2, 4, 3), relu(), torch.nn.Flatten(), lrp.Linear(64, 3), relu(),
                           lrp.Linear(3, 2)).double().eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for rule in ("epsilon", "gamma", "alpha2beta1", "flat"):
        torch.testing.assert_close(lrp.explain(inplace, x, rule=rule), lrp.explain(plain, x, rule=rule))
    assert inplace[1].inplace  # the user's modules are not changed
