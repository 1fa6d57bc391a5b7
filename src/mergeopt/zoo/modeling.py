"""Tokenizer and model configurations of the embedded zoo: a word-level tokenizer over the world's
vocabulary and small `LlamaForCausalLM` models, so that the zoo exercises exactly the code paths a
real Llama-family checkpoint does."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .world import BOS, EOS, PAD, UNK


@dataclass(frozen=True)
class ZooSize:
    """Architecture and training budget of one zoo size."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    pretrain_steps: int
    pretrain_lr: float
    sft_steps: int
    sft_lr: float
    expert_steps: int
    expert_lr: float
    batch: int

    def as_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, ZooSize] = {
    "default": ZooSize(hidden=128, layers=4, heads=4, ffn=512, pretrain_steps=900, pretrain_lr=3e-3,
                       sft_steps=150, sft_lr=1e-3, expert_steps=150, expert_lr=3e-4, batch=64),
    "test": ZooSize(hidden=64, layers=2, heads=4, ffn=256, pretrain_steps=800, pretrain_lr=3e-3,
                    sft_steps=100, sft_lr=2e-3, expert_steps=120, expert_lr=1e-3, batch=48),
}

MAX_POSITIONS = 64


def make_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: every word of the world is one token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=MAX_POSITIONS, padding_side="left",
                                   clean_up_tokenization_spaces=False)
    return fast


def make_config(size: ZooSize, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.ffn,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )
