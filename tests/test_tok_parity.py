"""Parity on the real corpora in ../shared/data:
- the tiktoken engine and the plain-Python reference encoder give identical ids;
- `import-bpe` of GPT-2's files encodes exactly as HF `tokenizers` does with the same files;
- `tokenizer-export --format hf` gives a tokenizer.json that HF encodes identically.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import smedjan
from smedjan.data.sources import expand_inputs, iter_chunks
from smedjan.tokenizer import Tokenizer


def corpus_files(shared: Path) -> list[Path]:
    return expand_inputs([shared / "pretrain"])


def corpus_texts(shared: Path, max_chars: int | None = None):
    for f in corpus_files(shared):
        for chunk in iter_chunks([f], max_chars=max_chars):
            yield f, chunk.text


def test_corpora_are_all_covered(shared_data):
    names = {p.name for p in corpus_files(shared_data)}
    for expected in ("tinyshakespeare.txt", "openwebtext_1000.jsonl.zst", "c4_demo.jsonl.zst", "wiki_demo.txt.zst",
                     "test.txt.zst", "tinystories_val.txt.zst", "melville-moby_dick.txt.zst", "1861-Lincoln.txt"):
        assert expected in names


def test_tiktoken_equals_reference_on_shared_corpora(tokenizer, shared_data):
    memo: dict = {}
    n = 0
    for f, text in corpus_texts(shared_data):
        fast = tokenizer.encode(text)
        ref = tokenizer.encode_reference(text, memo)
        assert fast == ref, f"{f}: encoders disagree"
        n += len(fast)
    assert n > 3_000_000


@pytest.fixture(scope="module")
def gpt2(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "gpt2.bin"
    d = shared_data / "tokenizer" / "gpt2_hf"
    res = smedjan("import-bpe", "--vocab", d / "vocab.json", "--merges", d / "merges.txt", "-o", out)
    assert res.code == 0, res
    return Tokenizer.load(out)


def hf_gpt2(shared_data):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    d = shared_data / "tokenizer" / "gpt2_hf"
    model = models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_import_bpe_encodes_like_hf_gpt2(gpt2, shared_data):
    hf = hf_gpt2(shared_data)
    assert gpt2.vocab_size == 50257 + 8 and gpt2.specials["<|endoftext|>"] == 50256
    n = 0
    for f, text in corpus_texts(shared_data):
        ours = gpt2.encode(text)
        assert ours == hf.encode(text).ids, f"{f}: GPT-2 ids differ from HF"
        n += len(ours)
    assert n > 3_000_000


def test_openai_file_names_give_the_same_tokenizer(gpt2, shared_data, tmp_path):
    d = shared_data / "tokenizer" / "gpt2_openai"
    out = tmp_path / "gpt2.bin"
    res = smedjan("import-bpe", "--vocab", d / "encoder.json", "--merges", d / "vocab.bpe", "-o", out)
    assert res.code == 0, res
    assert Tokenizer.load(out).fingerprint == gpt2.fingerprint


def test_known_gpt2_ids(gpt2):
    # "Hello world" is [15496, 995] in every GPT-2 tokenizer.
    assert gpt2.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_hf_export_encodes_identically(which, tokenizer, tokenizer_path, gpt2, shared_data, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = tokenizer if which == "trained" else gpt2
    src = tokenizer_path if which == "trained" else tmp_path / "g.bin"
    if which == "gpt2":
        gpt2.save(src)
    out = tmp_path / "tokenizer.json"
    res = smedjan("tokenizer-export", "--tokenizer", src, "--format", "hf", "-o", out)
    assert res.code == 0, res
    hf = HFTokenizer.from_file(str(out))
    assert hf.get_vocab_size() == tok.vocab_size
    # HF always turns special-token spellings in the text into their ids (TinyStories
    # has literal "<|endoftext|>"), which is our allow_special mode.
    specials_seen = 0
    for f, text in corpus_texts(shared_data, max_chars=400_000):
        ids = tok.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False).ids == ids, f"{f}: HF export differs"
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)
        specials_seen += len(set(ids) & set(tok.specials.values()))
    assert specials_seen > 0 or which == "trained"
    assert hf.token_to_id("<|bos|>") == tok.bos_id


def test_tiktoken_export(tokenizer_path, tokenizer, tmp_path):
    import base64

    import tiktoken

    out = tmp_path / "t.tiktoken"
    assert smedjan("tokenizer-export", "-t", tokenizer_path, "--format", "tiktoken", "-o", out).code == 0
    ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in out.read_text().splitlines())}
    from smedjan.formats import constants as C

    enc = tiktoken.Encoding("x", pat_str=C.PRETOKENIZER_PATTERNS["llama3"], mergeable_ranks=ranks, special_tokens={})
    text = "Shall I compare thee to a summer's day? 1234567"
    assert enc.encode_ordinary(text) == tokenizer.encode(text)


@pytest.mark.parametrize("case", ["bad_json", "not_object", "bad_merge", "unknown_token"])
def test_import_bpe_garbage(tmp_path, case, shared_data):
    from helpers import assert_user_error

    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    src = shared_data / "tokenizer" / "gpt2_hf"
    vocab.write_text((src / "vocab.json").read_text())
    merges.write_text((src / "merges.txt").read_text())
    if case == "bad_json":
        vocab.write_text('{"a": 0,')
        needle = "vocab.json"
    elif case == "not_object":
        vocab.write_text("[1, 2]")
        needle = "vocab.json"
    elif case == "bad_merge":
        merges.write_text(merges.read_text() + "onlyonetoken\n")
        needle = "merges.txt:"
    else:
        merges.write_text("Ġ zzzzqqq\n")
        needle = "merges.txt:1"
    out = tmp_path / "o.bin"
    assert_user_error(smedjan("import-bpe", "--vocab", vocab, "--merges", merges, "-o", out), needle)
    assert not out.exists()
