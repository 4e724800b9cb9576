"""The language encoder of SPEC 4: word embedding + one-layer LSTM, final hidden state h_T.

Expressions arrive LEFT-padded to T tokens (SPEC 2), so the LSTM reads all T steps
(the ``<pad>`` embedding is learned like any word) and its last step always reads a
real word. The ``bow`` option (bag of words) is an ablation beyond the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from referseg.config import Profile
from referseg.text import PAD, SPECIAL_TOKENS

PAD_ID = SPECIAL_TOKENS.index(PAD)  # SPEC 2: <pad> = 0


def init_forget_bias(lstm: nn.LSTM, forget_bias: float) -> None:
    """Zero every LSTM bias, then make the forget-gate bias ``forget_bias`` (TF ``forget_bias``, SPEC 4, 8).

    PyTorch orders the gates (i, f, g, o) and adds two bias vectors, ``b_ih + b_hh``; their sum
    is the gate bias, so the forget slice of ``b_ih`` carries it all. TF learns ONE bias per
    gate (zero at the start) and adds ``forget_bias`` as a constant: the same function at
    initialisation. When both PyTorch vectors train (``init="pytorch"``), each gets the same
    gradient, so the gate bias moves at twice the official rate; ``init="official"`` freezes
    ``b_hh`` at zero, which leaves one trained bias per gate, as in TF.
    """
    hidden = lstm.hidden_size
    with torch.no_grad():
        for name, param in lstm.named_parameters():
            if name.startswith("bias_"):
                param.zero_()
                if name.startswith("bias_ih"):
                    param[hidden : 2 * hidden] = forget_bias


class LanguageEncoder(nn.Module):
    """Token ids (B, T) -> one expression vector (B, d_text): LSTM h_T (SPEC 4) or bag of words."""

    def __init__(self, profile: Profile, vocab_size: int):
        super().__init__()
        self.kind = profile.text_encoder
        self.embedding = nn.Embedding(vocab_size, profile.d_embed)  # SPEC 4: 1000-d
        if profile.init == "official":  # SPEC 4: TF's default (glorot) uniform, not N(0, 1)
            bound = (6.0 / (vocab_size + profile.d_embed)) ** 0.5
            nn.init.uniform_(self.embedding.weight, -bound, bound)
        if self.kind == "lstm":
            # SPEC 4: one layer, d_text = 1000 hidden units, zero initial state.
            self.lstm = nn.LSTM(profile.d_embed, profile.d_text, num_layers=1, batch_first=True)
            init_forget_bias(self.lstm, profile.lstm_forget_bias)
            if profile.init == "official":
                self.lstm.bias_hh_l0.requires_grad_(False)  # one trained bias per gate, as TF
        else:
            # Ablation: mean of the non-pad word embeddings, then tanh(linear) to d_text, so the
            # classifier sees a vector of the same size and range as an LSTM state.
            self.project = nn.Linear(profile.d_embed, profile.d_text)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(tokens)  # (B, T, d_embed)
        if self.kind == "lstm":
            _, (h_n, _) = self.lstm(embedded)  # no state given: zeros (SPEC 4)
            return h_n[-1]  # final hidden state h_T, (B, d_text)
        is_word = (tokens != PAD_ID).unsqueeze(-1).to(embedded.dtype)
        mean = (embedded * is_word).sum(1) / is_word.sum(1).clamp(min=1.0)
        return torch.tanh(self.project(mean))
