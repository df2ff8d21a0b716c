"""A zoo of architectures nobody here wrote, built from their configs with random weights (no downloads).

Used by tests/test_zoo.py (what every model must pass) and bench_zoo.py (the coverage table in
the README's "Works with" section). Hugging Face models need `transformers` (the dev extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmd_lightning.layers import kind_of

VOCAB = 96


@dataclass
class Entry:
    """How to build one model, feed it, and read the tensor its outputs are compared on."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor] = lambda out: out.logits  # the tensor compared and backpropagated
    tied_head: str | None = None


def tokens(*shape: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(1))


def hf(config_class: str, model_class: str, **config: Any) -> Callable[[], nn.Module]:
    """A builder of a Hugging Face model from its config (random weights; imports transformers when called)."""

    def build() -> nn.Module:
        transformers = importlib.import_module("transformers")
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
DECODER |= {"num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32}


class TorchTransformerLM(nn.Module):
    """A word-level seq2seq LM on torch's own nn.Transformer, forward(inputs, target)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.transformer = nn.Transformer(32, 4, 2, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
        h = self.transformer(self.embed(inputs), self.embed(target), tgt_mask=mask, tgt_is_causal=True)
        return self.out(h)


class EncoderClassifier(nn.Module):
    """A ViT-like classifier on nn.TransformerEncoder, with the nested-tensor fast path on."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class AudioCNN(nn.Module):
    """A 1-D CNN over raw audio, with nn.Conv1d (and one depthwise conv, which stays dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 32, 9, stride=4),
            nn.ReLU(),
            nn.Conv1d(32, 64, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(64, 64, 3, padding=1, groups=64),
            nn.Conv1d(64, 96, 3, padding="same", padding_mode="reflect"),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(96, 10)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(audio).squeeze(-1))


class LSTMTagger(nn.Module):
    """An LSTM sequence model: nn.LSTM is not a layer kind (it stays as it is); its Linear layers are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.proj = nn.Linear(32, 48)
        self.lstm = nn.LSTM(48, 48, batch_first=True)
        self.head = nn.Linear(48, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(torch.relu(self.proj(self.embed(tokens))))[0])


ZOO: dict[str, Entry] = {
    "gpt2-lm": Entry(
        hf("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32),
        lambda: {"input_ids": tokens(2, 8)},
        tied_head="lm_head",
    ),
    "gpt2-classifier": Entry(
        hf(
            "GPT2Config",
            "GPT2ForSequenceClassification",
            n_embd=32,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=32,
            num_labels=3,
            pad_token_id=0,
        ),
        lambda: {"input_ids": tokens(2, 8)},
    ),
    "bert": Entry(
        hf(
            "BertConfig",
            "BertForSequenceClassification",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            num_labels=3,
        ),
        lambda: {"input_ids": tokens(2, 8), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])},
    ),
    "vit": Entry(
        hf(
            "ViTConfig",
            "ViTForImageClassification",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=4,
        ),
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))},
    ),
    "clip-vision": Entry(
        hf(
            "CLIPVisionConfig",
            "CLIPVisionModel",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))},
        output=lambda out: out.last_hidden_state,
    ),
    "t5": Entry(
        hf(
            "T5Config",
            "T5ForConditionalGeneration",
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
        ),
        lambda: {"input_ids": tokens(2, 8), "decoder_input_ids": tokens(2, 5)},
        tied_head="lm_head",
    ),
    "llama": Entry(hf("LlamaConfig", "LlamaForCausalLM", **DECODER), lambda: {"input_ids": tokens(2, 8)}),
    "qwen2": Entry(hf("Qwen2Config", "Qwen2ForCausalLM", **DECODER), lambda: {"input_ids": tokens(2, 8)}),
    "whisper": Entry(
        hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=16,
            vocab_size=VOCAB,
            pad_token_id=0,
            decoder_start_token_id=1,
        ),
        lambda: {
            "input_features": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3)),
            "decoder_input_ids": tokens(2, 5),
        },
        tied_head="proj_out",
    ),
    "nn.Transformer": Entry(
        TorchTransformerLM, lambda: {"inputs": tokens(2, 7), "target": tokens(2, 5)}, output=lambda out: out
    ),
    "nn.TransformerEncoder": Entry(
        EncoderClassifier,
        lambda: {"x": torch.randn(3, 6, 12, generator=torch.Generator().manual_seed(4))},
        output=lambda out: out,
    ),
    "conv1d-cnn": Entry(
        AudioCNN,
        lambda: {"audio": torch.randn(2, 1, 400, generator=torch.Generator().manual_seed(5))},
        output=lambda out: out,
    ),
    "lstm": Entry(LSTMTagger, lambda: {"tokens": tokens(2, 9)}, output=lambda out: out),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name].build().eval()


def run(name: str, model: nn.Module) -> torch.Tensor:
    return ZOO[name].output(model(**ZOO[name].inputs()))


def linear_like(model: nn.Module) -> dict[str, int]:
    """Parameters held by linear-like modules, counted on the dense model: name → numel."""
    held = {}
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(module, nn.MultiheadAttention):
            held[name] = sum(p.numel() for p in module.parameters())  # in_proj and out_proj
        elif isinstance(parent, nn.MultiheadAttention):
            continue  # counted with its attention
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(module).__name__ == "Conv1D":
            if getattr(module, "groups", 1) == 1:
                held[name] = sum(p.numel() for p in module.parameters(recurse=False))
    return held


@torch.no_grad()
def low_rank_(model: nn.Module, rank_share: float = 0.125) -> None:
    """Replace every weight a kind can factor by a rank-(min/8) matrix, so a high energy truncates it exactly."""
    for module in model.modules():
        matrices = []
        if isinstance(module, nn.MultiheadAttention):
            matrices = [*module.in_proj_weight.split(module.embed_dim), module.out_proj.weight]
        elif kind_of(module) is not None and not kind_of(module).opt_in and getattr(module, "groups", 1) == 1:
            matrices = [kind_of(module).dense_matrix(module)]
        for w in matrices:
            rank = max(1, int(min(w.shape) * rank_share))
            U, s, Vh = torch.linalg.svd(w, full_matrices=False)
            w.copy_((U[:, :rank] * s[:rank]) @ Vh[:rank])
