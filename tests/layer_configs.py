"""Layer configurations covering every conv hyperparameter, with matching input shapes."""
import torch

CONFIGS = {
    "linear": (lambda: torch.nn.Linear(7, 5), (3, 7)),
    "linear_nobias": (lambda: torch.nn.Linear(7, 5, bias=False), (3, 7)),
    "conv1d_stride_dilation": (lambda: torch.nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    "conv2d_3x3": (lambda: torch.nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    "conv2d_stride2_nonsquare": (lambda: torch.nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0)), (2, 3, 9, 8)),
    "conv2d_uneven_stride3": (lambda: torch.nn.Conv2d(2, 3, 4, stride=3), (2, 2, 10, 11)),
    "conv2d_5x5_stride2_nopad": (lambda: torch.nn.Conv2d(2, 3, 5, stride=2), (2, 2, 11, 11)),
    "conv2d_same_even": (lambda: torch.nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 7, 6)),
    "conv2d_valid": (lambda: torch.nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 6, 7)),
    "conv2d_dilation_tuple": (lambda: torch.nn.Conv2d(2, 3, 3, padding=(2, 1), dilation=(2, 1)), (2, 2, 7, 7)),
    "conv2d_groups": (lambda: torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv2d_nobias": (lambda: torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 5, 5)),
    "conv2d_reflect": (lambda: torch.nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 2, 6, 6)),
    "conv2d_replicate": (lambda: torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"), (2, 2, 7, 6)),
    "conv2d_circular": (lambda: torch.nn.Conv2d(2, 3, (3, 2), padding=1, padding_mode="circular"), (2, 2, 6, 5)),
    "conv2d_same_reflect": (lambda: torch.nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 2, 6, 6)),
    "conv3d": (lambda: torch.nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1), (2, 2, 4, 5, 4)),
    "convtranspose1d": (lambda: torch.nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (2, 3, 5)),
    "convtranspose2d_stride2": (lambda: torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                                (2, 3, 4, 4)),
    "convtranspose2d_groups_dilation": (lambda: torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=2, dilation=2,
                                                                         groups=2), (2, 4, 4, 5)),
    "convtranspose2d_nobias": (lambda: torch.nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), bias=False),
                               (2, 2, 3, 4)),
    "convtranspose3d": (lambda: torch.nn.ConvTranspose3d(2, 3, 2, stride=2), (2, 2, 2, 3, 2)),
}


def make_case(config, nonnegative):
    """Return (torch layer, torchlrp twin, float64 input, random output relevance) for a configuration."""
    import torchlrp as lrp

    make, shape = CONFIGS[config]
    torch_layer = make().double()
    layer = getattr(lrp, type(torch_layer).__name__).from_torch(torch_layer)
    x = torch.randn(shape, dtype=torch.float64)
    if nonnegative:
        x = x.relu()
    return torch_layer, layer, x, torch.randn_like(torch_layer(x))
