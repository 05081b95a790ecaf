"""Trains the tiny default's character-level BPE tokenizer on task text and wraps it for transformers.

The pre-tokenizer (``PRE_TOKEN_PATTERN``) lets merges join ``"="`` to up to two digits after it
(``"=1"``, ``"=10"``) and chat-marker characters to each other (``"Q:"``, ``"=\nA:"``), but never
a digit to another digit or to ``"+"``/``"-"``: a prompt or an answer tokenised on its own is one
token per character, which a model this small learns arithmetic from far faster than from BPE's
arbitrary digit pairs. Because a prompt ends with ``"="`` and a response starts with digits,
tokenising ``"5+5=10"`` in one piece gives other tokens (``"5", "+", "5", "=10"``) than tokenising
``"5+5="`` and ``"10"`` apart, which is what tests of prompt/response boundary handling need;
the model, trained on prompts and answers tokenised apart, has never seen the merged tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
USER_MARKER, ASSISTANT_MARKER = "Q:", "A:"
MODEL_MAX_LENGTH = 128
VOCAB_SIZE = 64  # a power of two: every power-of-two tensor-parallel size divides it
# Leftmost-first: "=" with 1-2 digits, else one digit, else a run of non-digits.
PRE_TOKEN_PATTERN = r"=\d{1,2}|\d|\D+"

# Renders "<s>Q:<user>\nA:<assistant></s>\n..."; with add_generation_prompt it ends with "A:".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_MARKER + "{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_MARKER + "{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_MARKER + "{% endif %}"
)


def chat_text(prompt: str, answer: str) -> str:
    """A one-turn conversation as the chat template writes it, without special tokens."""
    return f"{USER_MARKER}{prompt}\n{ASSISTANT_MARKER}{answer}"


def task_corpus(problems: Iterable[tuple[str, str]], chat_every: int = 10) -> list[str]:
    """Tokenizer training text: ``prompt + answer`` lines, and every ``chat_every``-th one chat-rendered too."""
    texts: list[str] = []
    for index, (prompt, answer) in enumerate(problems):
        texts.append(prompt + answer)
        if index % chat_every == 0:
            texts.append(chat_text(prompt, answer))
    return texts


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a character-level BPE (special tokens first) that prepends ``<s>`` when encoding.

    Raises:
        ValueError: if ``texts`` do not allow ``vocab_size`` tokens under ``PRE_TOKEN_PATTERN``.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate tokens; no spaces between them
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"trained {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def wrap_for_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wraps a trained tokenizer with its special tokens and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Saves ``tokenizer`` so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.

    The class is recorded as ``PreTrainedTokenizerFast`` (transformers 5 writes its own alias
    ``TokenizersBackend``) so that transformers 4 loads the directory too.
    """
    # A padded call leaves its padding (side included) set on the backend, which would be saved
    # into tokenizer.json and override ``padding_side`` on load.
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
