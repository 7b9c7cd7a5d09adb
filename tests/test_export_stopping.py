"""llama.cpp stops where smedjan stops: every end token of smedjan's generation is an
end-of-generation token of the exported GGUF, and no other token is.

Besides comparing llama.cpp's end-of-generation set with smedjan's, each special token is
made the greedy next token of a hand-built model (its blocks write nothing, so the last
hidden state is the last input token's embedding; the untied head's row for the target
token points along it), and the two engines' completions are compared: same tokens, same
finish reason, same text.
"""

from __future__ import annotations

import llama_cpp
import pytest
import torch

from smedjan.export.gguf import export_gguf
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.infer import Engine, SamplingParams
from smedjan.model import ModelConfig, Transformer
from smedjan.tokenizer.specials import end_ids


def steered_model(tok, last: int, target: int) -> Transformer:
    """A model whose greedy next token after input `last` is `target`."""
    cfg = ModelConfig.make(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=2, max_seq_len=64,
                           tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.layers:  # nothing is written into the residual stream
            block.mixer.wo.weight.zero_()
            block.ffn.w2.weight.zero_()
        e = model.tok_embeddings.weight[last]
        model.output.weight.mul_(0.01)
        model.output.weight[target] = 50.0 * e / e.norm()
    return model


def ours(model, tok, prompt: list[int], n: int):
    return Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=n))[0]


@pytest.fixture(scope="module")
def llama_for(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stop")

    def make(model) -> llama_cpp.Llama:
        ck, gguf = folder / "m.bin", folder / f"m{len(list(folder.iterdir()))}.gguf"
        save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=model.cfg, tokenizer=tokenizer)
        export_gguf(ck, gguf)
        return llama_cpp.Llama(str(gguf), n_ctx=64, n_threads=1, verbose=False)

    return make


def test_the_end_of_generation_sets_are_equal(tokenizer, llama_for):
    llm = llama_for(steered_model(tokenizer, 5, 6))
    vocab = llm._model.vocab
    eog = {t for t in range(tokenizer.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert eog == set(end_ids(tokenizer)) and len(eog) == 6


@pytest.mark.parametrize("name", C.SPECIAL_TOKENS)
def test_each_special_token_stops_both_or_neither(tokenizer, llama_for, name):
    tok = tokenizer
    last, target = tok.encode("ROMEO:")[-1], tok.specials[name]
    model = steered_model(tok, last, target)
    prompt = [tok.bos_id] + tok.encode("ROMEO:")
    mine = ours(model, tok, prompt, 6)
    assert mine.token_ids[0] == target  # the construction works
    theirs = llama_for(model).create_completion(prompt=prompt, max_tokens=6, temperature=0.0)
    choice = theirs["choices"][0]
    assert choice["finish_reason"] == mine.finish_reason
    if target in end_ids(tok):
        # llama-cpp-python does not count the end token; smedjan does
        assert mine.finish_reason == "stop" and mine.token_ids == [target]
        assert theirs["usage"]["completion_tokens"] == 0 and choice["text"] == ""
    else:
        # a control token that is not an end token renders as nothing in both, and both go on
        assert mine.finish_reason == "length" and theirs["usage"]["completion_tokens"] == 6
        assert choice["text"] == mine.text
