"""LSTM oracle in plain torch: torch.nn gate order (i, f, g, o), differentiable, exact in float64."""
from __future__ import annotations

import torch


def lstm_cell_pointwise(gates: torch.Tensor, c_prev: torch.Tensor):
    """One step from pre-activation gates [B, 4H] and c_prev [B, H] -> (h, c)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    h = o * torch.tanh(c)
    return h, c


def lstm_cell(x, h_prev, c_prev, w_ih, w_hh, b_ih=None, b_hh=None):
    """nn.LSTMCell's math: gates = x W_ih^T + b_ih + h W_hh^T + b_hh."""
    gates = x @ w_ih.t() + h_prev @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    return lstm_cell_pointwise(gates, c_prev)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False):
    """One LSTM layer, one direction, in the time-major "packed" layout.

    x [N, I]: the concatenation of the steps; step t holds the first batch_sizes[t] rows of the
    batch (a PackedSequence's data and batch_sizes; None = every step holds all B = h0.size(0)
    rows). A row that is not in a step keeps its h and c. reverse runs t = T-1 .. 0.
    h0 [B, P], c0 [B, H]; with w_hr [P, H] (proj_size) h = (o * tanh(c)) @ w_hr^T.
    Returns y [N, P], h_n [B, P], c_n [B, H] (each row's state after its last step).
    """
    B = h0.shape[0]
    if batch_sizes is None:
        sizes = [B] * (x.shape[0] // B)
    else:
        sizes = [int(b) for b in batch_sizes]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    h, c = h0, c0
    ys = [None] * len(sizes)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in steps:
        n, off = sizes[t], offsets[t]
        h_new, c_new = lstm_cell(x[off:off + n], h[:n], c[:n], w_ih, w_hh, b_ih, b_hh)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        ys[t] = h_new
        h = torch.cat([h_new, h[n:]]) if n < B else h_new
        c = torch.cat([c_new, c[n:]]) if n < B else c_new
    return torch.cat(ys), h, c


def lstm(input, hx, weights, *, num_layers=1, batch_first=False, dropout=0.0, training=False,
         bidirectional=False, proj_size=0, dropout_masks=None, generator=None):
    """torch.nn.LSTM's forward.

    input: [T, B, I] ([B, T, I] when batch_first), unbatched [T, I], or a PackedSequence.
    hx: None or (h0 [L*D, B, P], c0 [L*D, B, H]) (2-D when unbatched); P = proj_size or H.
    weights: per layer and direction (layer-major, as torch.nn.LSTM orders them), a tuple
    (w_ih, w_hh, b_ih or None, b_hh or None, w_hr or None).
    Dropout (training and dropout > 0) acts on every layer's output but the last: multiplies
    by dropout_masks[layer] / (1 - dropout) when masks are given (0/1 tensors shaped like that
    output: [N, D*P] in the packed/time-major layout), else draws Bernoulli masks from generator.
    Returns (output, (h_n, c_n)) exactly as torch.nn.LSTM does.
    """
    from torch.nn.utils.rnn import PackedSequence

    D = 2 if bidirectional else 1
    packed = isinstance(input, PackedSequence)
    unbatched = False
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        B = int(batch_sizes[0])
    else:
        batch_sizes = sorted_indices = unsorted_indices = None
        x = input
        if x.dim() == 2:
            unbatched = True
            x = x.unsqueeze(1)
        elif batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
        x = x.reshape(T * B, x.shape[2])
    H = weights[0][1].shape[1] if proj_size == 0 else weights[0][4].shape[1]
    P = proj_size if proj_size > 0 else H
    if hx is None:
        h0 = x.new_zeros(num_layers * D, B, P)
        c0 = x.new_zeros(num_layers * D, B, H)
    else:
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
    layer_in = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            y, h, c = lstm_layer(layer_in, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                 batch_sizes=batch_sizes, reverse=d == 1)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, dim=1) if D == 2 else outs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            if dropout_masks is not None:
                mask = dropout_masks[layer].to(layer_in.dtype)
            else:
                keep = torch.full(layer_in.shape, 1.0 - dropout, dtype=torch.float64, device=layer_in.device)
                mask = torch.bernoulli(keep, generator=generator).to(layer_in.dtype)
            layer_in = layer_in * mask / (1.0 - dropout)
    h_n, c_n = torch.stack(h_n), torch.stack(c_n)
    if packed:
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(layer_in, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
    out = layer_in.reshape(T, B, layer_in.shape[1])
    if unbatched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if batch_first:
        out = out.transpose(0, 1)
    return out, (h_n, c_n)
