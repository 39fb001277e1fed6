"""explain_dataset: the store equals lrp.explain sample by sample, on one process and on two (torchrun, gloo), a
stopped run resumes to the same store, and bad input gets a clear error that writes nothing."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import torchlrp as lrp
from torchlrp.data.dataset import explain_dataset, open_relevances

zarr = pytest.importorskip("zarr", minversion="3")
sys.path.insert(0, os.path.dirname(__file__))
from dataset_run import Samples, model  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "dataset_run.py")
ARRAYS = ("relevance", "scale", "logits", "prediction", "target", "label", "index", "done")


def run(store, crash_at=None, dtype="float16", **kwargs):
    """The run of dataset_run.py, in this process."""
    options = dict(batch_size=4, quiet=True, dtype=dtype, target="label")
    options.update(kwargs)
    return explain_dataset(model(), Samples(crash_at), "epsilon", store, **options)


def arrays(store):
    group = zarr.open_group(store, mode="r")
    return {name: np.asarray(group[name][:]) for name in ARRAYS}


def assert_same_store(first, second):
    one, two = arrays(first), arrays(second)
    for name in ARRAYS:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)


def run_script(store, *extra, nproc=None, wait=True):
    command = [sys.executable, SCRIPT, str(store), *extra]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   SCRIPT, str(store), *extra]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


@pytest.mark.parametrize("target", [None, "label", 2])
def test_store_equals_explain(tmp_path, device, target):
    data = Samples()
    report = explain_dataset(model(), data, "epsilon", tmp_path / "r.zarr", batch_size=8, dtype=torch.float32,
                             target=target, device=device, quiet=True)
    assert (report.samples, report.written, report.skipped, report.per_rank) == (37, 37, 0, (37,))
    relevances = open_relevances(tmp_path / "r.zarr")
    converted = lrp.convert(model())
    logits = converted(data.inputs).detach()
    wanted = {None: logits.argmax(1), "label": data.labels, 2: torch.full((37,), 2)}[target]
    # chunk by chunk, as the store was made: float32 kernels may round differently for another batch size, and the
    # epsilon rule's R / z magnifies that where z is near zero
    converted = converted.to(device)
    reference = torch.cat([lrp.explain(converted, data.inputs[begin:begin + 8].to(device),
                                       target=wanted[begin:begin + 8].to(device), rule="epsilon").cpu()
                           for begin in range(0, 37, 8)])
    torch.testing.assert_close(relevances[:], reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(relevances.logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(relevances.targets, wanted)
    assert torch.equal(relevances.predictions, logits.argmax(1))
    assert torch.equal(relevances.labels, data.labels)
    assert torch.equal(relevances.indices, torch.arange(37))
    assert relevances.complete and relevances.shape == (37, 1, 8, 8)
    assert relevances.settings["model"] == "Sequential" and relevances.settings["dtype"] == "float32"


def test_float16_keeps_every_heatmap_relative_to_its_peak(tmp_path):
    """Relevance peaks of 1e-9 and 1e6 (start="logit" of a scaled linear model) under- and overflow float16;
    the per-sample power-of-two scale keeps 11 bits relative to each peak."""
    linear = torch.nn.Sequential(torch.nn.Linear(6, 2)).eval()
    torch.nn.init.normal_(linear[0].weight)
    linear[0].bias.data.zero_()
    inputs = torch.randn(4, 6) * torch.tensor([1e-9, 1.0, 1e6, 0.0])[:, None]
    explain_dataset(linear, torch.utils.data.TensorDataset(inputs), "zero", tmp_path / "h.zarr", batch_size=2,
                    start="logit", quiet=True)
    reference = lrp.explain(lrp.convert(linear), inputs, rule="zero", start="logit")
    stored = open_relevances(tmp_path / "h.zarr")[:]
    peaks = reference.abs().amax(1, keepdim=True)
    assert reference[0].abs().max() < 1e-8 and reference[2].abs().max() > 1e5  # outside float16's range
    assert ((stored - reference).abs() <= 2 ** -11 * peaks).all()
    assert torch.equal(stored[3], torch.zeros(6))  # an all-zero heatmap stays zero (scale 1)
    plain = reference.half().float()  # what a plain float16 cast would have kept
    assert not torch.isfinite(plain[2]).all() and (plain[0] == 0).all()


def test_two_processes_with_torchrun_equal_one(tmp_path):
    run(tmp_path / "one.zarr")
    run_script(tmp_path / "two.zarr", nproc=2)
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    # each chunk was written by one rank: rank r wrote chunks r, r + 2, ... (the per-rank split of 10 chunks)
    assert open_relevances(tmp_path / "two.zarr").complete


def test_a_run_that_dies_resumes_to_the_same_store(tmp_path):
    run(tmp_path / "whole.zarr")
    with pytest.raises(RuntimeError, match="simulated crash at sample 13"):
        run(tmp_path / "resumed.zarr", crash_at=13)  # chunks 0-2 are written; chunk 3 (samples 12-15) dies
    partial = open_relevances(tmp_path / "resumed.zarr")
    assert partial.written.sum() == 12 and not partial.complete
    with pytest.raises(ValueError, match="not in the store yet"):
        partial[12]
    torch.testing.assert_close(partial[:12], open_relevances(tmp_path / "whole.zarr")[:12], rtol=0, atol=0)
    report = run(tmp_path / "resumed.zarr")
    assert (report.skipped, report.written) == (12, 25)
    assert_same_store(tmp_path / "whole.zarr", tmp_path / "resumed.zarr")


def test_a_killed_process_resumes_to_the_same_store(tmp_path):
    """SIGKILL part way (possibly in the middle of writing a chunk), then the same command again."""
    run(tmp_path / "whole.zarr")
    store = tmp_path / "killed.zarr"
    process = run_script(store, "--slow", wait=False)
    done_files = store / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and (not done_files.is_dir() or len(os.listdir(done_files)) < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written = open_relevances(store).written.sum()
    assert 12 <= written < 37
    run_script(store)
    assert_same_store(tmp_path / "whole.zarr", store)


def test_another_model_rule_or_dataset_is_refused_and_nothing_is_lost(tmp_path):
    store = tmp_path / "r.zarr"
    with pytest.raises(RuntimeError):
        run(store, crash_at=20)
    before = arrays(store)
    other = model()
    other[0].weight.data += 1
    with pytest.raises(ValueError, match="parameters_sha256"):
        explain_dataset(other, Samples(), "epsilon", store, batch_size=4, quiet=True, target="label")
    with pytest.raises(ValueError, match="rule: store"):
        explain_dataset(model(), Samples(), "zplus", store, batch_size=4, quiet=True, target="label")
    with pytest.raises(ValueError, match="samples: store 37, now 30"):
        explain_dataset(model(), Samples(samples=30), "epsilon", store, batch_size=4, quiet=True, target="label")
    with pytest.raises(ValueError, match="batch_size: store 4, now 5"):
        explain_dataset(model(), Samples(), "epsilon", store, batch_size=5, quiet=True, target="label")
    with pytest.raises(ValueError, match="dtype: store 'float16', now 'float32'"):
        run(store, dtype="float32")
    after = arrays(store)
    for name in ARRAYS:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_a_store_that_cannot_be_written_gets_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="cannot write the store"):
        run(blocker / "r.zarr")
    with pytest.raises(RuntimeError):
        run(tmp_path / "r.zarr", crash_at=5)
    read_only = zarr.storage.LocalStore(tmp_path / "r.zarr", read_only=True)
    with pytest.raises(PermissionError, match="read-only"):
        run(read_only)
    assert open_relevances(tmp_path / "r.zarr").written.sum() == 4


def test_a_folder_that_is_not_a_store_is_not_written_into(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a Zarr store"):
        run(folder)
    assert os.listdir(folder) == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(ValueError, match="torchlrp did not make"):
        run(tmp_path / "foreign.zarr")
    with pytest.raises(ValueError, match="did not write"):
        open_relevances(tmp_path / "foreign.zarr")
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        open_relevances(tmp_path / "missing.zarr")


@pytest.mark.parametrize("options, message", [
    ({"dtype": torch.bfloat16}, "float16 keeps 11 bits"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"num_workers": -1}, "num_workers"),
    ({"target": "best"}, "target must be None"),
    ({"target": 7}, "out of range for 3 classes"),
])
def test_bad_arguments(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "r.zarr", **options)
    assert not (tmp_path / "r.zarr").exists()


def test_bad_models_and_datasets(tmp_path):
    with pytest.raises(ValueError, match="training mode"):
        explain_dataset(model().train(), Samples(), "epsilon", tmp_path / "a.zarr", quiet=True)
    with pytest.raises(ValueError, match="empty"):
        explain_dataset(model(), Samples(samples=0), "epsilon", tmp_path / "b.zarr", quiet=True)
    unlabelled = torch.utils.data.TensorDataset(torch.randn(5, 1, 8, 8))
    with pytest.raises(ValueError, match="target='label' needs"):
        explain_dataset(model(), unlabelled, "epsilon", tmp_path / "c.zarr", target="label", quiet=True)
    mixed = [torch.randn(1, 8, 8)] * 4 + [torch.randn(1, 9, 9)]
    with pytest.raises(ValueError, match="every input must have one shape"):
        explain_dataset(model(), mixed, "epsilon", tmp_path / "d.zarr", batch_size=4, quiet=True)
    assert open_relevances(tmp_path / "d.zarr").written.sum() == 4  # the chunk before is kept
    from PIL import Image
    pictures = [(Image.new("L", (8, 8)), 0)] * 3
    with pytest.raises(ValueError, match="ToTensor"):
        explain_dataset(model(), pictures, "epsilon", tmp_path / "f.zarr", quiet=True)
    broken = model()
    broken[3].weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        explain_dataset(broken, Samples(), "epsilon", tmp_path / "e.zarr", quiet=True)


def test_indexing(tmp_path):
    run(tmp_path / "r.zarr", dtype="float32")
    relevances = open_relevances(tmp_path / "r.zarr")
    everything = relevances[:]
    assert torch.equal(relevances[5], everything[5]) and torch.equal(relevances[-1], everything[36])
    assert torch.equal(relevances[[3, 1]], everything[[3, 1]])
    assert torch.equal(relevances[torch.tensor([0, 36])], everything[[0, 36]])
    mask = relevances.labels == 1
    assert torch.equal(relevances[mask.numpy()], everything[mask])
    assert torch.equal(relevances[10:20:3], everything[10:20:3])
    assert relevances[[]].shape == (0, 1, 8, 8) and relevances[5:5].shape == (0, 1, 8, 8)
    with pytest.raises(IndexError, match="out of range"):
        relevances[37]
    with pytest.raises(IndexError, match="boolean mask"):
        relevances[np.ones(3, dtype=bool)]
    assert "37 written" in repr(relevances)


@pytest.fixture
def photos(tmp_path):
    """A folder of class folders (3 cats, 2 rockets) and a flat folder of the same 5 images, 48 px."""
    import skimage.data
    from PIL import Image

    pictures = {"cat": skimage.data.chelsea(), "rocket": skimage.data.rocket()}
    for name, count in (("cat", 3), ("rocket", 2)):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for number in range(count):
            picture = Image.fromarray(pictures[name]).resize((64, 48))
            picture.save(tmp_path / "classes" / name / f"{number}.png")
            (tmp_path / "flat").mkdir(exist_ok=True)
            picture.save(tmp_path / "flat" / f"{name}{number}.png")
    return tmp_path


def test_cli_explain_dataset(photos, capsys):
    from torchlrp.cli import main

    common = ["--model", "mobilenet_v3_small", "--random-weights", "--size", "48", "--batch-size", "2",
              "--num-workers", "0", "--rule", "epsilon-plus"]
    store = photos / "classes.zarr"
    assert main(["explain-dataset", str(photos / "classes"), "--store", str(store), "--num-classes", "2",
                 "--target", "label", *common]) == 0
    assert "5 samples explained" in capsys.readouterr().out
    relevances = open_relevances(store)
    assert relevances.complete and relevances.shape == (5, 3, 48, 48)
    assert relevances.labels.tolist() == [0, 0, 0, 1, 1] and torch.equal(relevances.targets, relevances.labels)
    assert relevances.settings["model"] == "mobilenet_v3_small" and relevances.settings["rule"] == "EpsilonPlus"
    # the same command again: nothing left to do (resumed), output quiet
    assert main(["explain-dataset", str(photos / "classes"), "--store", str(store), "--num-classes", "2",
                 "--target", "label", "--quiet", *common]) == 0
    assert capsys.readouterr().out == ""
    # a flat folder has no labels
    assert main(["explain-dataset", str(photos / "flat"), "--store", str(photos / "flat.zarr"), *common]) == 0
    flat = open_relevances(photos / "flat.zarr")
    assert flat.labels.tolist() == [-1] * 5 and flat.logits.shape == (5, 1000)


@pytest.mark.parametrize("args, message", [
    (["flat", "--target", "label"], "target='label' needs"),
    (["flat", "--target", "cat"], "--target must be"),
    (["nowhere"], "is not a folder"),
    (["classes", "--num-classes", "2"], "--num-classes 2 needs --weights"),
    (["flat", "--dtype", "float16", "--rule", "bogus"], "unknown rule"),
])
def test_cli_explain_dataset_errors(photos, capsys, args, message):
    from torchlrp.cli import main

    folder, *rest = args
    rest = [*rest] if "--num-classes" in rest else ["--random-weights", *rest]
    status = main(["explain-dataset", str(photos / folder), "--store", str(photos / "out.zarr"), "--size", "48",
                   "--model", "mobilenet_v3_small", "--num-workers", "0", "--quiet", *rest])
    assert status == 2 and message in capsys.readouterr().err


def test_an_fsspec_url_store(tmp_path):
    """A URL goes through fsspec (memory:// here; s3://, gs://, ... where fsspec has the backend)."""
    pytest.importorskip("fsspec")
    url = f"memory://{tmp_path.name}/run.zarr"
    run(tmp_path / "local.zarr")
    with pytest.raises(RuntimeError):
        run(url, crash_at=9)
    assert run(url).skipped == 8
    torch.testing.assert_close(open_relevances(url)[:], open_relevances(tmp_path / "local.zarr")[:], rtol=0, atol=0)
    assert torch.equal(open_relevances(url).logits, open_relevances(tmp_path / "local.zarr").logits)


def test_fused_kernels_give_the_same_store(tmp_path):
    """fused=True (torch.compile'd elementwise kernels) writes the eager run's numbers, up to reassociation."""
    run(tmp_path / "eager.zarr", dtype="float32")
    run(tmp_path / "fused.zarr", dtype="float32", fused=True)
    torch.testing.assert_close(open_relevances(tmp_path / "fused.zarr")[:], open_relevances(tmp_path / "eager.zarr")[:],
                               rtol=1e-5, atol=1e-7)
