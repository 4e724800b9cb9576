# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   referseg:
#     needs: [01_data]
# ---

# %% [markdown]
# # Language encoding: tokens, vocabulary, LSTM
#
# In Section 3.1 of the paper, {cite:t}`hu2016segmentation` encode the expression as
# follows (our paraphrase, not a quotation): each word is embedded by a word embedding
# matrix, an LSTM with a $D_{text}$-dimensional hidden state reads the embedded words,
# its hidden state at the final step is the expression's vector, and that vector is
# L2-normalised, like the visual features.
#
# SPEC §2 and §4 give the details, all taken from the official code:
# the tokenizer (a regular expression that keeps separators as tokens), the vocabulary
# (4 special tokens, then words), the length $T = 20$ with **left** padding, and the
# LSTM (1000-d embedding, 1000 hidden units, forget-gate bias 1, zero initial state).
# This chapter shows each step on real ReferIt expressions when the official query files
# are present (parameter `referit_official`), and on SynthRef, the data this run trains
# on.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # random initialisation of the encoder shown here
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
# the official ReferIt query files (expressions, no images); skipped when absent
referit_official: str = "../shared/data/referit-official"  # official query files

# %% tags=["hide-input"]
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display

from referseg import viz
from referseg.config import get_profile
from referseg.data.refer import OfficialReferIt, build_vocab, load_refer
from referseg.model.language import LanguageEncoder
from referseg.text import PAD, SPECIAL_TOKENS, Vocabulary, encode, tokenize

viz.setup_style()
cfg = get_profile(profile, **overrides)
torch.manual_seed(seed)
print(f"profile {cfg.name!r}: T = {cfg.seq_len}, d_embed = {cfg.d_embed}, "
      f"d_text = {cfg.d_text}")
print(f"encoder {cfg.text_encoder}, forget-gate bias {cfg.lstm_forget_bias}")

# %% [markdown]
# ## The tokenizer (SPEC §2)
#
# The official `text_processing.py` strips the sentence, splits it with the regular
# expression `(\W+)` *keeping the separators*, drops blank pieces, lowercases the rest
# without stripping them, and drops a final `"."`. A separator keeps its spaces: in
# `"man, left"` the comma token is `", "` (comma and space), which the official
# vocabulary does not hold, so it becomes `<unk>`. The `repr` below makes the spaces
# visible.

# %%
official_root = Path(referit_official)
referit = None
if official_root.is_dir() and any(official_root.glob("referit_query_*.json")):
    referit = OfficialReferIt(official_root)
    source = referit.pairs("trainval")
    tricky = [p.expression for p in source if any(c in p.expression for c in ",-'")][:4]
    print(f"real ReferIt expressions from {official_root}")
else:
    refer_for_examples = load_refer(cfg)
    tricky = [p.expression for p in refer_for_examples.pairs(cfg.train_split)][:4]
    print(f"no official ReferIt files at {official_root}:")
    print("using SynthRef expressions")
samples = tricky + ["Man on the left, in RED.", "the guy's hat", "sky - top right"]
pd.DataFrame({"expression": samples,
              "tokens": [" ".join(repr(t) for t in tokenize(s)) for s in samples]})

# %% [markdown]
# ## The vocabulary and the unknown-token rate
#
# The vocabulary starts with `<pad>`=0, `<go>`=1, `<eos>`=2, `<unk>`=3, then the words.
# The official ReferIt file (`vocabulary_referit.txt`, 8,803 entries) is used when
# present; otherwise one is built from the training split, an accepted variant (SPEC
# §2). On ReferIt, SPEC §2 records about 5% unknown tokens (4.95% on trainval, 4.99% on
# test with the official file), mean length 3.54 tokens, and a few dozen expressions
# longer than 20 tokens. The table measures them again.

# %% tags=["hide-input"]
def language_stats(expressions_by_split: dict[str, list[str]],
                   vocab: Vocabulary) -> pd.DataFrame:
    """Per split: expressions, tokens, mean and max length, expressions longer than T,
    % unknown tokens."""
    rows = {}
    for split, expressions in expressions_by_split.items():
        lengths = np.array([len(tokenize(e)) for e in expressions])
        rows[split] = {
            "expressions": len(expressions), "tokens": int(lengths.sum()),
            "mean length": round(float(lengths.mean()), 2),
            "max length": int(lengths.max()),
            f"longer than T={cfg.seq_len}": int((lengths > cfg.seq_len).sum()),
            "% unknown tokens": round(100 * vocab.unknown_rate(expressions), 2),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


if referit is not None:
    vocab_file = official_root / "vocabulary_referit.txt"
    if vocab_file.is_file():
        referit_vocab = Vocabulary.load(vocab_file)
        vocab_source = f"official file {vocab_file.name}"
    else:
        referit_vocab = Vocabulary.build(p.expression
                                         for p in referit.pairs("trainval"))
        vocab_source = "built from trainval"
    referit_expressions = {
        split: [p.expression for p in referit.pairs(split) if p.expression.strip()]
        for split in ("trainval", "test")
    }
    viz.print_wrapped(f"ReferIt vocabulary: {vocab_source}, {len(referit_vocab)} "
                      f"tokens; first ones: {referit_vocab.tokens[:10]}")
    display(language_stats(referit_expressions, referit_vocab))
    unknown = Counter(t for e in referit_expressions["test"] for t in tokenize(e)
                      if t not in referit_vocab)
    common = [(repr(t), n) for t, n in unknown.most_common(8)]
    viz.print_wrapped(f"most frequent unknown test tokens: {common}")
    unknown_total = sum(unknown.values())
    separators = sum(n for t, n in unknown.items() if not any(c.isalnum() for c in t))
    viz.print_wrapped(
        f"Of the {unknown_total:,} unknown ReferIt test tokens, {separators:,} "
        f"({100 * separators / max(unknown_total, 1):.0f}%) are separators with their "
        "spaces (such as ', ' and ' - '); the others are words that the vocabulary "
        "lacks.")
else:
    print("ReferIt statistics skipped: no official query files")

# %% [markdown]
# On ReferIt, the lines above say which kinds of token are unknown (when the official
# query files are present). This run's vocabulary is built from its own training split.
# SynthRef's generator adds a noise word to a few expressions (the share is `NOISE_RATE`
# in `referseg/data/synthetic.py`): a typo ("cirlce"), a filler ("um") or an odd word
# ("thingy"). The next cell counts the test tokens that the vocabulary
# lacks, and says whether the noise words are among them.

# %%
from referseg.data.synthetic import FILLER_WORDS, ODD_THING_WORDS, TYPOS

refer = load_refer(cfg)
vocab = build_vocab(cfg, refer)
run_expressions = {split: [p.expression for p in refer.pairs(split)]
                   for split in (cfg.train_split, cfg.eval_split)}
print(f"this run's vocabulary ({cfg.dataset}, built from {cfg.train_split!r}): "
      f"{len(vocab)} tokens")
display(language_stats(run_expressions, vocab))
test_tokens = [t for e in run_expressions[cfg.eval_split] for t in tokenize(e)]
unknown = Counter(t for t in test_tokens if t not in vocab)
unknown_share = sum(unknown.values()) / max(len(test_tokens), 1)
common = [(repr(t), n) for t, n in unknown.most_common(8)]
viz.print_wrapped(f"unknown test tokens: {common}")
noise_words = set(FILLER_WORDS) | set(ODD_THING_WORDS) | set(TYPOS.values())
noisy = Counter(t for t in test_tokens if t in noise_words)
noisy_unknown = sum(n for t, n in unknown.items() if t in noise_words)
train_words = {t for e in run_expressions[cfg.train_split] for t in tokenize(e)}
n_train, n_test = (len(run_expressions[s]) for s in (cfg.train_split, cfg.eval_split))
if cfg.dataset != "synthref":
    sentence = (f"{sum(unknown.values()):,} of the {len(test_tokens):,} test tokens "
                f"({unknown_share:.2%}) are unknown to this vocabulary.")
elif not unknown:
    if noisy:
        seen = "each of them" if set(noisy) <= train_words else "not all of them"
        noise = (f"The generator's noise words occur {sum(noisy.values())} times in "
                 f"the {cfg.eval_split} expressions "
                 f"({', '.join(repr(t) for t in sorted(noisy))}), and {seen} also "
                 f"occurs in the {cfg.train_split} split: its {n_train:,} expressions "
                 f"draw on the same short word lists as the {n_test:,} "
                 f"{cfg.eval_split} expressions. ")
    else:
        noise = (f"None of the generator's noise words occurs in the {cfg.eval_split} "
                 "expressions. ")
    sentence = (
        f"No {cfg.eval_split} token is unknown to this vocabulary (0 of "
        f"{len(test_tokens):,}). {noise}This run's model therefore never reads <unk> "
        "at test time, unlike a model on ReferIt, whose unknown share SPEC §2 records "
        "and the table above measures when the official query files are present.")
else:
    others = sum(unknown.values()) - noisy_unknown
    sentence = (
        f"{sum(unknown.values())} of the {len(test_tokens):,} {cfg.eval_split} tokens "
        f"({unknown_share:.2%}) are unknown to this vocabulary: {noisy_unknown} of "
        f"them are the generator's noise words, and {others} are words that the "
        f"{n_train:,} {cfg.train_split} expressions do not use.")
viz.print_wrapped(sentence)

# %% [markdown]
# ## Left padding to $T = 20$ (SPEC §2)
#
# Each expression keeps its first 20 tokens and is padded **on the left** with `<pad>`;
# no `<eos>` is appended. The LSTM reads all 20 steps, so its last step always reads the
# expression's last word.

# %%
examples = [p.expression for p in refer.pairs(cfg.eval_split)[:4]]
examples.append("the red circle on the far left of the picture")
ids = torch.tensor([vocab.encode(e, cfg.seq_len) for e in examples])
shown = pd.DataFrame([[vocab.tokens[i] for i in row] for row in ids.tolist()],
                     index=examples)
shown.columns = [f"t{t + 1}" for t in range(cfg.seq_len)]
shown.iloc[:, -8:]  # the last 8 of the 20 steps

# %% [markdown]
# ## The LSTM encoder (SPEC §4)
#
# Embedding (`d_embed`), one LSTM layer (`d_text` hidden units) from a zero state, final
# hidden state $h_T$. PyTorch orders the LSTM gates $(i, f, g, o)$ and TensorFlow
# $(i, j, f, o)$; the official code's `forget_bias=1.0` becomes a forget-gate slice of
# the PyTorch bias initialised to 1 (SPEC §8). The encoder below is freshly initialised
# (the trained one appears in chapter 4), which is enough to see what the padding does.

# %%
encoder = LanguageEncoder(cfg, len(vocab)).eval()
hidden = cfg.d_text
gate_bias = (encoder.lstm.bias_ih_l0 + encoder.lstm.bias_hh_l0).detach()
gate_means = [float(gate_bias[k * hidden:(k + 1) * hidden].mean()) for k in range(4)]
pd.DataFrame({"gate": ["input i", "forget f", "cell g", "output o"],
              "initial bias (mean over units)": gate_means})

# %% [markdown]
# The hidden state at every step, for the expressions above: during the padding steps
# every expression follows the same trajectory (they read the same `<pad>` tokens from
# the same zero state), then each one moves off when its first word arrives. With
# **right** padding the final state would be read after a run of `<pad>` steps, which
# can wash the words out of the state, so that the final states of different
# expressions become alike ({numref}`fig-language-padding`; the line below the figure
# compares them).

# %% tags=["hide-input", "remove-output"]
import matplotlib.pyplot as plt


def hidden_states(tokens: torch.Tensor) -> torch.Tensor:
    """All hidden states h_1..h_T of the encoder's LSTM, (B, T, d_text)."""
    with torch.no_grad():
        return encoder.lstm(encoder.embedding(tokens))[0]


def right_padded(expression: str) -> list[int]:
    """The expression's first T token ids, then <pad> up to T (not the official way)."""
    words = vocab.ids(tokenize(expression)[:cfg.seq_len])
    return words + [vocab.index[PAD]] * (cfg.seq_len - len(words))


right_ids = torch.tensor([right_padded(e) for e in examples])
left_states, right_states = hidden_states(ids), hidden_states(right_ids)


def final_similarity(states: torch.Tensor) -> float:
    """Mean cosine similarity between the final states of different expressions."""
    final = F.normalize(states[:, -1], dim=1)
    cosine = final @ final.T
    return float(cosine[~torch.eye(len(final), dtype=torch.bool)].mean())


fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, states, name in ((axes[0], left_states, "left padding (official)"),
                         (axes[1], right_states, "right padding")):
    reference = states[0]
    for row in range(len(examples)):
        ax.plot(range(1, cfg.seq_len + 1), (states[row] - reference).norm(dim=1),
                marker=".", label=examples[row][:30])
    ax.set_title(f"{name}: mean cosine of final states {final_similarity(states):.2f}")
    ax.set_xlabel("time step t")
    ax.set_xticks(range(1, cfg.seq_len + 1, 2))
axes[0].set_ylabel(r"$\|h_t - h_t^{(first\ expression)}\|$")
axes[1].legend(fontsize=7)
fig.tight_layout()
viz.glue_figure("fig-language-padding", fig)

# %% [markdown]
# ```{glue:figure} fig-language-padding
# :name: fig-language-padding
#
# How far each expression's hidden state $h_t$ is from the first expression's at every
# step $t$, with the official left padding (left) and with right padding (right); the
# titles give the mean cosine similarity of the final states of different expressions.
# ```

# %% tags=["hide-input"]
left_cosine = final_similarity(left_states)
right_cosine = final_similarity(right_states)
alike = ("more alike with right padding" if right_cosine > left_cosine else
         "not more alike with right padding, for this encoder and these expressions")
viz.print_wrapped(f"Mean cosine similarity of the final states of different "
                  f"expressions: {left_cosine:.2f} with left padding, "
                  f"{right_cosine:.2f} with right padding: the final states are "
                  f"{alike}.")

# %% [markdown]
# ## The L2-normalised expression vector (SPEC §4)
#
# The final state $h_T$ is L2-normalised before it is tiled over the grid and
# concatenated with the (also normalised) visual vectors, so text and image enter the
# classifier at the same scale.

# %%
with torch.no_grad():
    h_final = encoder(ids)
normalised = F.normalize(h_final, dim=1)
pd.DataFrame({"expression": examples,
              "norm of h_T": h_final.norm(dim=1).numpy().round(3),
              "norm after L2 normalisation": normalised.norm(dim=1).numpy().round(3)})

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* What share of all tokens in this run's training expressions are separators
#    (tokens with no letter or digit)? And in ReferIt's trainval, when present?

# %% tags=["solution", "hide-cell"]
def separator_share(expressions: list[str]) -> float:
    tokens = [t for e in expressions for t in tokenize(e)]
    return 100 * sum(not any(c.isalnum() for c in t) for t in tokens) / len(tokens)


share = separator_share(run_expressions[cfg.train_split])
print(f"{cfg.dataset} {cfg.train_split}: {share:.2f}% separators")
if referit is not None:
    share = separator_share(referit_expressions["trainval"])
    print(f"ReferIt trainval: {share:.2f}% separators")

# %% [markdown]
# 2. *(medium)* Build a vocabulary from this run's training split keeping only words
#    seen at least 2 (then 5) times (`Vocabulary.build(..., min_count=...)`). How do its
#    size and the test split's unknown-token rate change?

# %% tags=["solution", "hide-cell"]
rows = {}
for min_count in (1, 2, 5):
    v = Vocabulary.build(run_expressions[cfg.train_split], min_count=min_count)
    unknown_rate = v.unknown_rate(run_expressions[cfg.eval_split])
    rows[min_count] = {"tokens": len(v),
                       "% unknown on test": round(100 * unknown_rate, 2)}
pd.DataFrame.from_dict(rows, orient="index").rename_axis("min_count")

# %% [markdown]
# 3. *(medium)* Why does the official code pad on the left rather than append an `<eos>`
#    token and read the state at the true end of each expression? Name one advantage and
#    one cost.

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Left padding lets one batched LSTM call read all $T$ steps and take the state at the
# last step for every expression, with no per-sequence lengths or packing: the last step
# is always a real word. The cost is that the LSTM also reads up to $T - 1$ `<pad>`
# steps first; their embedding is learned, and the starting state of the real words
# depends on how many pads came before them, i.e. on the expression's length. The figure
# above compares it with the alternative, right padding without lengths, whose final
# state is read after the pads.
# ```

# %% [markdown]
# 4. *(harder)* Check the claim of SPEC §8 on gate order: set the bias of the *third*
#    quarter of `bias_ih_l0` (what TensorFlow calls the forget gate) to 1 instead, and
#    compare how quickly the state forgets the first word of a 20-token sequence of real
#    words.

# %% tags=["solution", "hide-cell"]
def memory_of_first_word(quarter: int) -> float:
    """Change in h_T when only the first of 20 words changes, with the bias 1 on one
    quarter of the gates."""
    enc = LanguageEncoder(cfg, len(vocab)).eval()
    with torch.no_grad():
        for name, param in enc.lstm.named_parameters():
            if name.startswith("bias_"):
                param.zero_()
        enc.lstm.bias_ih_l0[quarter * hidden:(quarter + 1) * hidden] = 1.0
        words = [t for t in vocab.tokens if t not in SPECIAL_TOKENS]
        rng = np.random.default_rng(seed)
        base = list(rng.choice(words, size=cfg.seq_len))
        changed = [w for w in words if w != base[0]][:1] + base[1:]
        a, b = (enc(torch.tensor([encode(s, vocab, cfg.seq_len)]))
                for s in (base, changed))
        return float((a - b).norm())


print(f"PyTorch forget gate (2nd quarter) = 1: |dh_T| = {memory_of_first_word(1):.4f}")
print(f"TF's position (3rd quarter = PyTorch's cell input g) = 1: "
      f"|dh_T| = {memory_of_first_word(2):.4f}")
