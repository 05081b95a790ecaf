"""Turn a prompt (text or chat messages) and a response into token ids with a clean boundary.

The prompt and the response are tokenised separately and concatenated, so no token spans the
prompt/response boundary: every response token is a trained target and no prompt token is.
Texts longer than the tokenizer's model_max_length are tokenised quietly (verbose=False): the
length policy (length_policy.py) decides what happens to them and reports it, so transformers'
"will result in indexing errors" warning would only mislead.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from nemo_aligner.data.jsonl import DataFormatError


def render_prompt(prompt: str | list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """The text of a prompt: a string as it is, chat messages through the tokenizer's chat template.

    Args:
        prompt: a string, or a list of ``{"role", "content"}`` messages (already validated).
        tokenizer: renders chat messages with its ``chat_template`` and a generation prompt.

    Returns:
        (text, from_template): the prompt text, and whether it came from the chat template (a
        template writes its own special tokens such as BOS, so they must not be added again).

    Raises:
        ValueError: the prompt is a message list and the tokenizer has no chat template.
    """
    if isinstance(prompt, str):
        return prompt, False
    if tokenizer.chat_template is None:
        raise ValueError(
            "the prompt is a list of chat messages but the tokenizer has no chat template: use a tokenizer "
            "whose tokenizer_config.json has a 'chat_template' (or set tokenizer.chat_template), or give "
            "prompts as plain strings"
        )
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return text, True


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str, *, from_template: bool) -> list[int]:
    """Token ids of a prompt on its own.

    Args:
        tokenizer: the policy's tokenizer.
        prompt_text: the prompt, as returned by render_prompt.
        from_template: True if the text came from a chat template. Then the text already holds the
            special tokens and none are added; otherwise the tokenizer adds the ones it adds to a
            single sequence (BOS for Llama-style tokenizers, none for GPT-2).

    Returns:
        prompt_ids: [P] ids.
    """
    return tokenizer(prompt_text, add_special_tokens=not from_template, verbose=False)["input_ids"]


def tokenize_record_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, Any]], *,
                           where: str) -> list[int]:
    """Token ids of a data record's prompt: render_prompt, then tokenize_prompt.

    Args:
        tokenizer: the policy's tokenizer.
        prompt: a string, or a list of ``{"role", "content"}`` messages (already validated).
        where: the prompt's place in the data, ``"path:LINE: field 'name'"``, for the error.

    Returns:
        prompt_ids: [P] ids.

    Raises:
        DataFormatError: the prompt cannot be rendered (no chat template, or the template raised);
            the message starts with ``where``.
    """
    try:
        prompt_text, from_template = render_prompt(prompt, tokenizer)
    except Exception as err:  # the chat template's own errors (jinja2) have no common base but Exception
        raise DataFormatError(f"{where}: cannot render it ({type(err).__name__}: {err})") from err
    return tokenize_prompt(tokenizer, prompt_text, from_template=from_template)


def tokenize_response(tokenizer: PreTrainedTokenizerBase, response_text: str) -> list[int]:
    """Token ids of a response on its own, without special tokens, ending with exactly one EOS.

    EOS ids that the text itself ends with (a literal EOS token string) are replaced by the one
    appended, so a response never ends with two. An empty response becomes ``[eos]``; whether that
    is acceptable is the dataset's decision.

    Args:
        tokenizer: the policy's tokenizer; it must define an EOS token.
        response_text: the response.

    Returns:
        response_ids: [R] ids, R >= 1, the last one EOS.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so that responses can be terminated")
    ids = tokenizer(response_text, add_special_tokens=False, verbose=False)["input_ids"]
    while ids and ids[-1] == eos:
        ids.pop()
    return [*ids, eos]


def tokenize_prompt_and_response(tokenizer: PreTrainedTokenizerBase, prompt_text: str, response_text: str, *,
                                 from_template: bool) -> tuple[list[int], list[int]]:
    """Prompt and response ids, tokenised separately so that no token spans their boundary.

    ``prompt_ids + response_ids`` is the training sequence; ``len(prompt_ids)`` is where the
    trained targets begin. See tokenize_prompt and tokenize_response for the special tokens.

    Args:
        tokenizer: the policy's tokenizer.
        prompt_text: the prompt, as returned by render_prompt.
        response_text: the response.
        from_template: whether prompt_text came from a chat template.

    Returns:
        (prompt_ids [P], response_ids [R]): the response ends with exactly one EOS id.
    """
    return (tokenize_prompt(tokenizer, prompt_text, from_template=from_template),
            tokenize_response(tokenizer, response_text))
