"""Built-in chat templates render the reference formats (FastChat / Meta) token for token."""

import copy

import pytest

from ctc_drafter.models.templates import LLAMA2_SYSTEM, build_prompt_ids, encode_conversation

TURNS = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
         {"role": "user", "content": "Another?"}]


@pytest.fixture
def bos_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer made to prepend its BOS, as LLaMA-2's does."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_bos_token = True
    return tok


def test_llama2chat_opens_every_user_turn_with_bos(bos_tokenizer):
    tok = bos_tokenizer
    bos, eos = tok.bos_token, tok.eos_token
    ids = build_prompt_ids(tok, TURNS, "llama2chat")
    # FastChat's LLaMA-2 format (sep2 " </s><s>"), as Meta's chat_completion tokenises it
    assert tok.decode(ids) == (f"{bos}[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nName a prime. [/INST]"
                               f" Seven. {eos}{bos}[INST] Another? [/INST]")
    assert ids.count(tok.bos_token_id) == 2 and ids[0] == tok.bos_token_id
    full, mask = encode_conversation(tok, TURNS + [{"role": "assistant", "content": "Eleven."}], "llama2chat")
    assert full[: len(ids)] == ids  # the prompt is a prefix of the whole conversation
    second_bos = ids.index(tok.bos_token_id, 1)
    assert not mask[second_bos] and mask[second_bos - 1]  # the BOS is prompt; the eos before it is the answer's
    assert tok.decode([t for t, m in zip(full, mask) if m]) == f" Seven. {eos} Eleven. {eos}"


def test_llama2chat_without_a_bos_token_adds_none(smol_tokenizer):
    assert not getattr(smol_tokenizer, "add_bos_token", True)  # SmolLM2 uses no BOS
    ids = build_prompt_ids(smol_tokenizer, TURNS, "llama2chat")
    assert smol_tokenizer.bos_token_id not in ids
    assert smol_tokenizer.decode(ids).count("[INST]") == 2


def test_a_leading_system_message_replaces_the_default_system_prompt(smol_tokenizer):
    """Chat clients (the server's callers) send a system message first; every template takes it."""
    tok = smol_tokenizer
    sysmsg = [{"role": "system", "content": "You answer in French."}]
    for template in ("vicuna", "llama2chat"):
        text = tok.decode(build_prompt_ids(tok, sysmsg + TURNS, template))
        assert "You answer in French." in text and "A chat between" not in text and LLAMA2_SYSTEM not in text
        plain = build_prompt_ids(tok, TURNS, template)
        assert tok.decode(plain) != text
    chat = tok.decode(build_prompt_ids(tok, sysmsg + TURNS, "auto"))  # SmolLM2's own template
    assert "You answer in French." in chat
    ids, mask = encode_conversation(tok, sysmsg + TURNS + [{"role": "assistant", "content": "Onze."}], "auto")
    assert tok.decode([t for t, m in zip(ids, mask) if m]).count("Onze.") == 1
    with pytest.raises(Exception, match="message 1 should be from the assistant"):
        build_prompt_ids(tok, TURNS[:1] + sysmsg + TURNS[2:], "vicuna")  # a system message only first
