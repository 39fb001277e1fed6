"""A small explain_dataset run for the tests: ``python tests/dataset_run.py STORE [--crash-at I]``, also under torchrun.

The model and data come from fixed seeds, so every process (and every run) sees the same ones.
"""
import argparse
import time

import torch

from torchlrp.data.dataset import explain_dataset


class Samples(torch.utils.data.Dataset):
    """37 random 1x8x8 inputs with labels; reading sample ``crash_at`` raises (a run that dies part way); ``slow``
    takes 50 ms a sample."""

    def __init__(self, crash_at=None, samples=37, slow=False):
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(samples, 1, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (samples,), generator=generator)
        self.crash_at, self.slow = crash_at, slow

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        if index == self.crash_at:
            raise RuntimeError(f"simulated crash at sample {index}")
        if self.slow:  # slow enough to be killed part way
            time.sleep(0.05)
        return self.inputs[index], self.labels[index]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3)).eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--concepts", nargs="*", help="layers whose concept statistics are recorded")
    args = parser.parse_args()
    explain_dataset(model(), Samples(args.crash_at, slow=args.slow), "epsilon", args.store, batch_size=4, quiet=True,
                    dtype=args.dtype, target="label", concepts=args.concepts or None)
