"""A byte-level BPE tokenizer trained offline on the factworld corpus.

Byte-level (as GPT-2): any text encodes, nothing is ever unknown. One special token,
``<|endoftext|>``, serves as BOS, EOS and padding. The tokenizer *prepends* it to every
encoded text (``add_special_tokens=True``), because pretraining packs texts as
``<|endoftext|> text <|endoftext|> text ...``: a prompt encoded for editing or evaluation then
starts exactly as every training text did. Special tokens have empty character offsets
``(0, 0)``, so offset-based span lookups skip them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3072, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for transformers.

    Deterministic for the same texts in the same order (the ``tokenizers`` BPE trainer breaks
    frequency ties by byte order).
    """
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: " Velandra" after a prompt and "Velandra" at a text start are
    # different tokens, exactly as in GPT-2; objects always follow a space in prompts.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eot_id = tok.token_to_id(EOT)
    tok.post_processor = processors.Sequence([
        # keep offsets untrimmed (a token's span includes its leading space, as in GPT-2)
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot_id)]),
    ])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The ``transformers`` view of a trained ``tokenizers.Tokenizer``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))
