"""The chat template: exact token layout and loss-mask positions, and input validation."""
from __future__ import annotations

import pytest

from tritium.model.chat import CHAT_MARKERS, encode_chat, encode_prompt, render_chat, stop_token_ids


def test_markers_are_the_contract_strings():
    assert CHAT_MARKERS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def test_render_chat_layout():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    assert render_chat(messages) == "<s><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|>"
    assert render_chat(messages[:2], add_generation_prompt=True) == (
        "<s><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_chat_is_the_text_of_encode_chat(char_tokenizer, generation_prompt):
    """Same defaults, same BOS, same markers: the rendered text spells encode_chat's ids piece by piece."""
    tok = char_tokenizer
    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xy"}]
    kwargs = {"add_generation_prompt": True} if generation_prompt else {}
    ids, _ = encode_chat(tok, messages, **kwargs)
    names = {tok.bos_id: "<s>", **{i: m for m, i in tok.special_ids.items()}}
    text = "".join(names[i] if i in names else tok.decode([i]) for i in ids)
    assert render_chat(messages, **kwargs) == text


def test_encode_chat_exact_ids_and_mask(char_tokenizer):
    tok = char_tokenizer
    sys_, user, asst, end = (tok.special_ids[m] for m in CHAT_MARKERS)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "xyz"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "q"}]
    ids, mask = encode_chat(tok, messages)
    e = tok.encode
    expected = ([tok.bos_id, sys_] + e("s") + [end, user] + e("ab") + [end, asst] + e("xyz") + [end, user]
                + e("c") + [end, asst] + e("q") + [end])
    assert ids == expected
    # positions: 0 bos, 1 <|system|>, 2 s, 3 end, 4 <|user|>, 5 a, 6 b, 7 end, 8 <|assistant|>,
    # 9 x, 10 y, 11 z, 12 end, 13 <|user|>, 14 c, 15 end, 16 <|assistant|>, 17 q, 18 end
    assert [i for i, m in enumerate(mask) if m] == [9, 10, 11, 12, 17, 18]
    assert len(mask) == len(ids) == 19


def test_generation_prompt_is_unmasked_assistant_marker(char_tokenizer):
    tok = char_tokenizer
    messages = [{"role": "user", "content": "2+3"}]
    ids, mask = encode_chat(tok, messages, add_generation_prompt=True)
    assert ids[-1] == tok.special_ids["<|assistant|>"]
    assert sum(mask) == 0
    assert encode_prompt(tok, messages) == ids
    assert stop_token_ids(tok) == [tok.end_of_turn_id, tok.eos_id]


def test_empty_assistant_content_still_trains_the_stop(char_tokenizer):
    tok = char_tokenizer
    ids, mask = encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}])
    assert ids[-2:] == [tok.special_ids["<|assistant|>"], tok.end_of_turn_id]
    assert mask[-2:] == [0, 1]


@pytest.mark.parametrize("messages, error, text", [
    ("hello", TypeError, "list"),
    ([{"role": "bot", "content": "x"}], ValueError, "role"),
    ([{"role": "user", "content": 3}], TypeError, "content"),
    ([{"role": "user"}], ValueError, "missing 'content'"),
    ([["user", "x"]], TypeError, "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ValueError, "only come first"),
    ([{"role": "user", "content": "a<|end|>b"}], ValueError, "reserved chat marker"),
])
def test_invalid_messages_raise_clear_errors(char_tokenizer, messages, error, text):
    with pytest.raises(error, match=None) as info:
        encode_chat(char_tokenizer, messages)
    assert text in str(info.value)


def test_tokenizer_without_markers_is_a_clear_error():
    class Plain:
        bos_id = 1
        special_ids: dict[str, int] = {}  # noqa: RUF012 - a stand-in without markers

        def encode(self, text):
            return [5] * len(text)

    with pytest.raises(ValueError, match="chat marker"):
        encode_chat(Plain(), [{"role": "user", "content": "a"}])
