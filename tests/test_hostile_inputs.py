"""Hostile-user probes (issues 29 and 30): each test is the reproduction that once failed -- a crash, a silent
wrong answer or a traceback -- and checks that the user now gets a correct result or one clear error, with nothing
already stored lost."""
import copy
import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import torchlrp as lrp
from torchlrp import evaluate, imagenet
from torchlrp.data.dataset import explain_dataset
from torchlrp.data.store import StoreDamagedError, open_relevances, verify_store

zarr = pytest.importorskip("zarr", minversion="3")
sys.path.insert(0, os.path.dirname(__file__))
from dataset_run import Samples, model  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "torchlrp.cli", *args], capture_output=True, text=True, timeout=600)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and lines[0].startswith("torchlrp: error:")


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)


class OtherSamples(Samples):
    """As Samples (same length and shapes), other values."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inputs = torch.randn(self.inputs.shape, generator=torch.Generator().manual_seed(7))


def explain_into(store, data=None, rule="epsilon", net=None, **kwargs):
    options = dict(batch_size=4, quiet=True, target="label", dtype="float32")
    options.update(kwargs)
    return explain_dataset(net or model(), data or Samples(), rule, store, **options)


def stored(store):
    group = zarr.open_group(store, mode="r")
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}


# --- SpRAy -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maps", ["zeros", "identical", "scaled copies"])
def test_spray_on_degenerate_heatmaps_returns_one_cluster_instead_of_crashing(maps):
    """Once a segmentation fault inside scikit-learn's t-SNE (run in a subprocess: a crash fails, not kills)."""
    made = {"zeros": "torch.zeros(12, 1, 8, 8)", "identical": "torch.rand(1, 1, 8, 8).repeat(12, 1, 1, 1)",
            "scaled copies": "torch.rand(1, 1, 8, 8) * torch.arange(1, 13.).view(12, 1, 1, 1)"}[maps]
    result = run_python(f"""
        import warnings, torch
        from torchlrp.analysis.spray import spray
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = spray({made}, n_neighbors=3, max_clusters=4, size=(8, 8))
        assert found.n_clusters == 1 and (found.clusters == 0).all(), found
        assert found.embedding.shape == (12, 2) and (found.embedding == 0).all()
        assert any("same map" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_spray_with_some_dead_heatmaps_still_clusters_and_warns():
    torch.manual_seed(0)
    maps = torch.cat([torch.zeros(6, 1, 8, 8), torch.rand(6, 1, 8, 8)])
    with pytest.warns(RuntimeWarning, match="6 of 12 heatmaps are all zero"):
        found = lrp.analysis.spray(maps, n_neighbors=3, max_clusters=4, size=(8, 8), embedding="none")
    assert (found.clusters[:6] == found.clusters[0]).all()  # the dead ones together
    with pytest.raises(ValueError, match="only 1 different maps"):
        lrp.analysis.spray(torch.zeros(12, 1, 8, 8), n_clusters=3, n_neighbors=3, max_clusters=4, size=(8, 8),
                           embedding="none")


# --- stores: data, chunks, rules and models that cannot mix or rot -----------------------------------------------

def test_a_resume_with_other_data_is_refused_before_anything_is_written(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    group = zarr.open_group(store, mode="r+")
    group["done"][6:] = False  # a run stopped halfway
    before = stored(store)
    with pytest.raises(ValueError, match="made from other data: chunk 0 "):
        explain_into(store, OtherSamples())
    after = stored(store)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    with pytest.raises(ValueError, match="check_data must be one of"):
        explain_into(store, check_data="some")
    report = explain_into(store, check_data="all")  # the right data resumes
    assert report.skipped == 24 and open_relevances(store).complete


def test_only_the_middle_chunk_differing_is_found_with_check_data_all(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    zarr.open_group(store, mode="r+")["done"][9] = False
    changed = Samples()
    changed.inputs[13] += 1  # chunk 3 of the stored ones; "sample" checks chunks 0, 1, 2, 4, 5, 6, 7, 8 and 3
    with pytest.raises(ValueError, match="chunk 3 "):
        explain_into(store, changed, check_data="all")


def test_a_deleted_chunk_is_named_on_reading_resuming_and_verifying_and_repaired(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    reference = open_relevances(store)[:]
    os.remove(os.path.join(store, "relevance", "c", "5", "0", "0", "0"))  # chunk 5: samples 20..23
    with pytest.raises(StoreDamagedError, match=r"chunk 5 \(samples 20...23\) of array 'relevance'"):
        open_relevances(store)[20:24]
    np.testing.assert_array_equal(open_relevances(store)[:20].numpy(), reference[:20].numpy())
    with pytest.raises(StoreDamagedError, match="holds 9 relevance chunks"):
        explain_into(store)
    health = verify_store(store)
    assert not health.healthy and list(health.damaged) == [5] and "relevance" in health.damaged[5]
    assert "repair" in str(health)
    repaired = verify_store(store, repair=True)
    assert repaired.repaired and not open_relevances(store).complete
    report = explain_into(store)
    assert report.written == 4 and verify_store(store).healthy
    np.testing.assert_array_equal(open_relevances(store)[:].numpy(), reference.numpy())


def test_flipped_bytes_in_a_chunk_raise_instead_of_returning_garbage(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    path = os.path.join(store, "relevance", "c", "2", "0", "0", "0")
    data = bytearray(open(path, "rb").read())
    for position in range(len(data) // 2, len(data) // 2 + 8):
        data[position] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(StoreDamagedError, match=r"chunk 2 \(samples 8...11\) of array 'relevance' is damaged .*checksum"):
        open_relevances(store)[8:12]
    assert list(verify_store(store).damaged) == [2]


def test_the_cli_verifies_and_repairs_a_store(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    result = run_cli("verify-store", str(store))
    assert result.returncode == 0 and "healthy" in result.stdout
    os.remove(os.path.join(store, "label", "c", "3"))
    result = run_cli("verify-store", str(store))
    assert result.returncode == 1 and "chunk 3: label: the chunk is missing" in result.stdout
    result = run_cli("verify-store", str(store), "--repair")
    assert result.returncode == 0 and "marked undone" in result.stdout
    assert one_line_error(run_cli("verify-store", str(tmp_path / "nothing.zarr")))


def test_rules_whose_reprs_agree_and_models_of_equal_parameters_are_told_apart(tmp_path):
    low = torch.full((1, 1, 8, 8), -3.0)
    high = torch.linspace(3.1, 3.9, 64).view(1, 1, 8, 8)
    nudged = high.clone()
    nudged[0, 0, 3, 3] += 1e-5  # the same repr (4 decimals)
    first, second = lrp.EpsilonGammaBox(low, high), lrp.EpsilonGammaBox(low, nudged)
    assert repr(first) == repr(second)
    store = tmp_path / "r.zarr"
    explain_into(store, rule=first, batch_size=37)
    with pytest.raises(ValueError, match="same name, other parameters"):
        explain_into(store, rule=second, batch_size=37)
    other = model()
    leaky = torch.nn.Sequential(other[0], torch.nn.LeakyReLU(0.5), other[2], other[3]).eval()
    assert lrp.store.parameters_sha256(leaky) == lrp.store.parameters_sha256(model())
    with pytest.raises(ValueError, match="another architecture"):
        explain_into(store, rule=first, net=leaky, batch_size=37)


def test_a_store_stopped_while_being_created_is_created_again(tmp_path, monkeypatch):
    from torchlrp import store as store_module
    from torchlrp.data.store import writing as writing_module

    def dies(group, settings):
        group.create_array("relevance", shape=(1,), dtype="float32")
        raise KeyboardInterrupt

    monkeypatch.setattr(writing_module, "create_arrays", dies)
    with pytest.raises(KeyboardInterrupt):
        explain_into(tmp_path / "r.zarr")
    monkeypatch.undo()
    with pytest.raises(StoreDamagedError, match="stopped while being created"):
        open_relevances(tmp_path / "r.zarr")
    report = explain_into(tmp_path / "r.zarr")
    assert report.written == 37 and verify_store(tmp_path / "r.zarr").healthy


def test_hand_edited_stores_raise_one_clear_error(tmp_path):
    store = tmp_path / "r.zarr"
    explain_into(store)
    group = zarr.open_group(store, mode="r+")
    settings = dict(group.attrs["torchlrp"])
    group.attrs["torchlrp"] = {**settings, "samples": 10 ** 9}  # would allocate gigabytes
    with pytest.raises(StoreDamagedError, match=r"array '\w+' has shape .* its settings say \(250000000"):
        open_relevances(store)
    group.attrs["torchlrp"] = {**settings, "batch_size": 5}
    with pytest.raises(StoreDamagedError, match="in chunks of"):
        open_relevances(store)
    with pytest.raises(StoreDamagedError, match="edited by hand"):
        explain_into(store, batch_size=5)  # the edited settings match, the arrays do not
    group.attrs["torchlrp"] = settings
    group["done"].resize((5,))  # shortened by hand
    with pytest.raises(StoreDamagedError, match="'done' has shape"):
        open_relevances(store)
    group["done"].resize((10,))
    group["done"][:] = True
    open(os.path.join(store, "done", "c", "4"), "wb").close()  # a zero-byte flag
    with pytest.raises(StoreDamagedError, match="done flag of chunk 4"):
        open_relevances(store)


def test_two_runs_creating_one_store_at_once_get_a_clear_error(tmp_path, monkeypatch):
    from torchlrp import store as store_module
    from torchlrp.data.store import writing as writing_module

    real = zarr.open_group

    def racing(store, mode="a", **kwargs):  # the other run creates the store between the check and the creation
        if mode == "w-":
            real(store, mode="w-")
        return real(store, mode=mode, **kwargs)

    monkeypatch.setattr(store_module.require_zarr(), "open_group", racing)
    with pytest.raises(ValueError, match="another process created the store"):
        explain_into(tmp_path / "r.zarr")


def test_a_file_as_the_store_and_a_read_only_filesystem_get_clear_errors(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a Zarr store"):
        explain_into(afile)
    assert afile.read_text() == "mine"
    from torchlrp import store as store_module
    from torchlrp.data.store import writing as writing_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writing_module, "create_arrays", read_only)
    with pytest.raises(PermissionError, match="cannot write the store .*Read-only file system"):
        explain_into(tmp_path / "new.zarr")


# --- Sequential with a layer used twice ---------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["epsilon", "zplus", "flat-first"])
def test_a_layer_used_twice_in_sequential_explains_like_its_untied_copy(rule):
    rule = lrp.EpsilonPlusFlat() if rule == "flat-first" else rule
    shared = lrp.Linear(16, 16)
    tied = lrp.Sequential(shared, lrp.ReLU(), shared, lrp.ReLU(), shared).eval().double()
    untied = lrp.Sequential(shared, lrp.ReLU(), copy.deepcopy(shared), lrp.ReLU(),
                            copy.deepcopy(shared)).eval().double()
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(tied(x, explain=True, rule=rule), tied(x))
    np.testing.assert_allclose(lrp.explain(tied, x, target=0, rule=rule).numpy(),
                               lrp.explain(untied, x, target=0, rule=rule).numpy(), rtol=1e-12, atol=1e-14)


def test_a_batch_norm_after_one_use_of_a_tied_layer_is_refused_not_folded_into_both():
    shared = lrp.Linear(8, 8)
    tied = lrp.Sequential(shared, torch.nn.BatchNorm1d(8), lrp.ReLU(), shared).eval()
    with pytest.raises(ValueError, match="used more than once"):
        lrp.explain(tied, torch.randn(2, 8), target=0)


# --- one clear error instead of a traceback -----------------------------------------------------------------------

@pytest.fixture
def picture(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_cli_paths_targets_sizes_and_devices_give_one_line(tmp_path, picture):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    common = ("--model", "alexnet", "--random-weights", "--size", "64")
    result = run_cli("explain", str(picture), *common, "--out", str(afile / "x.png"))
    assert one_line_error(result) and "cannot make the output directory" in result.stderr, result.stderr
    dangling = tmp_path / "link.png"
    os.symlink(tmp_path / "elsewhere" / "target.png", dangling)
    result = run_cli("explain", str(picture), *common, "--out", str(dangling))
    assert one_line_error(result) and "not overwritten" in result.stderr
    assert not os.path.exists(tmp_path / "elsewhere")
    result = run_cli("explain", str(picture), "--model", "alexnet", "--random-weights", "--size", "100000")
    assert one_line_error(result) and "--size must be" in result.stderr
    result = run_cli("explain", str(picture), *common, "--device", "meta", "--out", str(tmp_path / "o"))
    assert one_line_error(result) and "meta" in result.stderr
    folder = tmp_path / "photos"
    folder.mkdir()
    os.link(picture, folder / "x.png")
    result = run_cli("explain-dataset", str(folder), *common, "--store", str(afile))
    assert one_line_error(result) and "is a file" in result.stderr, result.stderr
    result = run_cli("explain-dataset", str(folder), *common, "--store", str(tmp_path / "s.zarr"), "--target", "²")
    assert one_line_error(result) and "--target must be" in result.stderr


def test_cli_refuses_weights_that_give_nan_and_writes_nothing(tmp_path, picture):
    import torchvision

    weights = tmp_path / "nan.pth"
    state = torchvision.models.alexnet().state_dict()
    state["classifier.6.bias"] = torch.full_like(state["classifier.6.bias"], float("nan"))
    torch.save(state, weights)
    out = tmp_path / "out"
    result = run_cli("explain", str(picture), "--model", "alexnet", "--weights", str(weights), "--size", "64",
                     "--out", str(out))
    assert one_line_error(result) and "not finite" in result.stderr, result.stderr
    assert not out.exists() or not os.listdir(out)


def test_cli_read_only_filesystem_is_one_line(tmp_path, picture, monkeypatch, capsys):
    from torchlrp import cli

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "makedirs", read_only)
    assert cli.main(["explain", str(picture), "--model", "alexnet", "--random-weights", "--size", "64",
                     "--out", str(tmp_path / "out")]) == 2
    assert "Read-only file system" in capsys.readouterr().err


class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x), x


class Named(Pair):
    def forward(self, x):
        return {"hidden": x, "scores": self.layer(x)}


def test_models_returning_tuples_or_dicts_are_explained_or_told_what_to_pass():
    x = torch.randn(2, 4)
    plain = Pair().eval()
    pair = lrp.convert(plain)
    expected = lrp.explain(lrp.convert(plain.layer), x, target=1)
    torch.testing.assert_close(lrp.explain(pair, x, target=1), expected)  # the first tensor
    named = Named().eval()
    named.load_state_dict(plain.state_dict())
    named = lrp.convert(named)
    with pytest.raises(ValueError, match=r"keys \['hidden', 'scores'\].*pass output="):
        lrp.explain(named, x, target=1)
    torch.testing.assert_close(lrp.explain(named, x, target=1, output="scores"), expected)
    with pytest.raises(ValueError, match="output='logits' selects nothing"):
        lrp.explain(named, x, target=1, output="logits")


def test_torchscript_models_are_refused_with_what_to_do():
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval())
    with pytest.raises(TypeError, match="TorchScript.*before torch.jit.script"):
        lrp.convert(scripted)


def test_a_module_fx_cannot_find_falls_back_to_run_time_with_its_rules():
    class Hidden(torch.nn.Module):  # Cadene's NASNet: a module kept in a plain list (fx: NameError)
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            self.hidden = [torch.nn.ReLU()]

        def forward(self, x):
            return self.layer(self.hidden[0](x))

    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        converted = lrp.convert(Hidden().eval())
    x = torch.randn(3, 4, dtype=torch.float64)
    converted.double()
    with torch.no_grad():
        converted.layer.bias.zero_()
    contributions = x.clamp(min=0) * converted.layer.weight[0].detach()  # LRP-0 of a linear layer after a ReLU
    expected = contributions / contributions.sum(1, keepdim=True)
    relevance = lrp.explain(converted, x, target=0, rule="zero")
    torch.testing.assert_close(relevance, expected)


# --- images -------------------------------------------------------------------------------------------------------

def test_an_extreme_aspect_ratio_does_not_blow_up_memory(tmp_path):
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.new("RGB", (20000, 1), (200, 10, 10)).save(path)
    result = run_python(f"""
        import resource, torch
        from torchlrp import imagenet
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        picture = imagenet.load_image({str(path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert picture.shape == (3, 224, 224)
        print((after - before) / 1024)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 200, f"peak memory grew by {result.stdout.strip()} MB"  # was 12 GB


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert abs(float(imagenet.load_image(str(tmp_path / "ramp16.png"), 32).mean()) - 0.5) < 0.02  # was 0.998
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values, mode="F").save(tmp_path / "ramp.tiff")
    assert abs(float(imagenet.load_image(str(tmp_path / "ramp.tiff"), 32).mean()) - 0.5) < 0.02  # was 0.000
    Image.fromarray(values * 300, mode="F").save(tmp_path / "wide.tiff")
    with pytest.raises(ValueError, match=r"float image with values in \[0, 300\]"):
        imagenet.load_image(str(tmp_path / "wide.tiff"))


# --- evaluation on degenerate input -------------------------------------------------------------------------------

def test_spearman_uses_average_ranks_and_is_nan_for_a_constant_map():
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    background = torch.zeros(4, 200)  # mostly exact zeros, as on a black background
    background[:, :24] = torch.rand(4, 24, generator=generator)
    other = torch.zeros(4, 200)
    other[:, 100:124] = torch.rand(4, 24, generator=generator)
    ours = lrp.evaluate.spearman(background, other)
    expected = [scipy_stats.spearmanr(background[i], other[i]).statistic for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)
    assert float(ours.abs().max()) < 0.2  # arbitrary tie order gave 0.65
    with pytest.warns(RuntimeWarning, match="constant map"):
        undefined = lrp.evaluate.spearman(torch.zeros(1, 50), torch.arange(50.)[None])
    assert torch.isnan(undefined).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        lrp.evaluate.spearman(torch.full((1, 5), float("nan")), torch.zeros(1, 5))


def test_rank_accuracy_counts_ties_at_their_expected_share():
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 0] = True  # 7 of 49 pixels: chance 1/7
    with pytest.warns(RuntimeWarning, match="constant"):
        assert torch.isnan(evaluate.relevance_rank_accuracy(torch.zeros(1, 7, 7), mask)).all()  # was 0.333
    relevance = torch.zeros(1, 7, 7)
    relevance[0, 0, :2] = 1.0  # 2 of the top 7 certain, 5 places shared by the 47 tied pixels, 5 of them inside
    expected = (2 + 5 * 5 / 47) / 7
    assert abs(float(evaluate.relevance_rank_accuracy(relevance, mask)) - expected) < 1e-12


def test_flipping_and_tuning_refuse_nan_relevance_and_noise_on_one_pixel():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval()
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="relevance holds NaN or inf"):
        evaluate.pixel_flipping(net, x, torch.full_like(x, float("nan")), [0, 1])  # was the all-zero curve
    with pytest.raises(ValueError, match="candidate 'nan'"):
        evaluate.tune(net, x, [0, 1], {"nan": lambda m, i, t: torch.full_like(i, float("nan")),
                                       "random": lambda m, i, t: evaluate.random_relevance(i)})
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)).eval()
    one = torch.rand(2, 3, 1, 1)
    with pytest.raises(ValueError, match="fill='noise'"):
        evaluate.pixel_flipping(tiny, one, torch.rand_like(one), [0, 1], fill="noise")


def test_a_model_or_input_on_the_meta_device_gets_one_clear_error():
    model = lrp.convert(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="'meta' device"):
        lrp.explain(model, torch.randn(1, 3, device="meta"))
    with pytest.raises(ValueError, match=r"'meta' device \('0.weight'"):
        lrp.explain(model.to("meta"), torch.randn(1, 3))


def test_pixel_flipping_breaks_ties_of_an_all_zero_map_at_random():
    from torchlrp import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x, zeros = torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    curves = [evaluate.pixel_flipping(net, x, zeros, target=0, seed=seed, order="morf").morf for seed in range(3)]
    assert not torch.equal(curves[0], curves[1]) or not torch.equal(curves[0], curves[2])
    torch.testing.assert_close(evaluate.pixel_flipping(net, x, zeros, target=0, seed=1, order="morf").morf, curves[1])
