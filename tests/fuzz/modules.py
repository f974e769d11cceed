"""Tiny fastbig.nn modules with their torch.nn twins, and tiny fastbig.models, shared by
test_state, test_compile_export, test_distributed and test_determinism."""
import torch

import fastbig


def _g(seed):
    return torch.Generator().manual_seed(seed)


def module_cases():
    """name -> (make_fastbig(), make_torch_twin(), make_inputs(), forward kwargs). Twins have
    identical state_dict keys; fastbig.nn.MultiheadAttention runs its fused path only with
    need_weights=False."""
    from torch import nn
    from fastbig.models._layers import TorchSelfAttention
    fnn = fastbig.nn

    def x(*s, seed=0):
        return torch.randn(*s, generator=_g(seed))

    def seq(conv, act):
        return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), *([act] if act else []))

    return {
        "MultiheadAttention": (lambda: fnn.MultiheadAttention(16, 2, batch_first=True),
                               lambda: nn.MultiheadAttention(16, 2, batch_first=True),
                               lambda: (x(2, 5, 16),) * 3, dict(need_weights=False)),
        "SelfAttention": (lambda: fnn.SelfAttention(16, causal=True), lambda: TorchSelfAttention(16, causal=True),
                          lambda: (x(2, 5, 16),), {}),
        "LSTM": (lambda: fnn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
                 lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
                 lambda: (x(2, 7, 5),), {}),
        "LSTM_proj": (lambda: fnn.LSTM(5, 6, proj_size=3), lambda: nn.LSTM(5, 6, proj_size=3),
                      lambda: (x(7, 2, 5),), {}),
        "LSTMCell": (lambda: fnn.LSTMCell(5, 6), lambda: nn.LSTMCell(5, 6), lambda: (x(3, 5),), {}),
        "ConvBnReLU2d": (lambda: fnn.ConvBnReLU2d(3, 4, 3, padding=1),
                         lambda: seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU()),
                         lambda: (x(2, 3, 6, 6),), {}),
        "ConvBnLeakyReLU2d": (lambda: fnn.ConvBnLeakyReLU2d(3, 4, 3, padding=1, negative_slope=0.2),
                              lambda: seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.LeakyReLU(0.2)),
                              lambda: (x(2, 3, 6, 6),), {}),
        "ConvBn2d": (lambda: fnn.ConvBn2d(3, 4, 3, bias=True),
                     lambda: seq(nn.Conv2d(3, 4, 3, bias=True), None), lambda: (x(2, 3, 6, 6),), {}),
        "ConvTransposeBnReLU2d": (lambda: fnn.ConvTransposeBnReLU2d(3, 4, 3, stride=2, padding=1),
                                  lambda: seq(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False),
                                              nn.ReLU()),
                                  lambda: (x(2, 3, 5, 5),), {}),
    }


def model_cases():
    """name -> (make(fused: bool), make_inputs()) at tiny sizes."""
    M = fastbig.models

    def x(*s, seed=0):
        return torch.randn(*s, generator=_g(seed))

    def ids(hi, *s, seed=0):
        return torch.randint(0, hi, s, generator=_g(seed))

    return {
        "SimpleCNN": (lambda f: M.SimpleCNN(3, 4, image_size=8, fused=f), lambda: (x(2, 3, 8, 8),)),
        "BigModel": (lambda f: M.BigModel(3, 4, image_size=8, hidden=16, fused=f), lambda: (x(2, 3, 8, 8),)),
        "MNISTNet": (lambda f: M.MNISTNet(image_size=8, hidden=16, fused=f), lambda: (x(2, 1, 8, 8),)),
        "MLP": (lambda f: M.MLP(12, (8, 8), 3, fused=f), lambda: (x(2, 12),)),
        "Autoencoder": (lambda f: M.Autoencoder(12, (8,), 4, fused=f), lambda: (x(2, 12),)),
        "WideDeep": (lambda f: M.WideDeep(4, (5, 5), 4, (8, 4), fused=f), lambda: (x(2, 4), ids(5, 2, 2))),
        "ResNet": (lambda f: M.ResNet((1, 1, 1, 1), width=4, num_classes=3, small_input=True, fused=f),
                   lambda: (x(2, 3, 8, 8),)),
        "LSTMClassifier": (lambda f: M.LSTMClassifier(5, 6, 2, 3, fused=f), lambda: (x(2, 7, 5),)),
        "SelfAttentionClassifier": (lambda f: M.SelfAttentionClassifier(5, embed_dim=8, num_classes=3,
                                                                        max_len=16, fused=f),
                                    lambda: (x(2, 7, 5),)),
        "Transformer": (lambda f: M.Transformer(11, d_model=16, nhead=2, num_encoder_layers=1,
                                                num_decoder_layers=1, dim_feedforward=16, max_len=16, fused=f),
                        lambda: (ids(11, 2, 6), ids(11, 2, 5, seed=1))),
        "BertEncoder": (lambda f: M.BertEncoder(20, 16, 1, 2, 16, max_position=16, dropout=0.0,
                                                num_classes=3, fused=f), lambda: (ids(20, 2, 6),)),
        "DCGAN": (lambda f: M.DCGAN(nz=4, ngf=8, ndf=8, image_size=8, fused=f), lambda: (x(3, 4),)),
    }
