"""Parity with llama.cpp itself, through llama-cpp-python (a test dependency: never skipped).

For the trained micro checkpoint exported to GGUF:
- llama.cpp tokenizes test strings and real corpus text exactly as we do (with and without
  special-token parsing), and detokenizes back to the same bytes;
- the f32 file's logits equal our forward pass (1e-5 relative with an f32 KV cache, 1e-3 with
  llama.cpp's default f16 cache);
- llama.cpp's greedy sampler produces our greedy 32 tokens;
- q8_0 / q4_0 stay within the perplexity bounds stated in PPL_BOUNDS;
- create_chat_completion with the embedded template feeds the model our chat token stream;
- every RoPE scaling kind gives our logits;
- outside HF folders: with a tokenizer.json (as export-hf writes) the GGUF equals the
  checkpoint's own export; with --tokenizer, llama.cpp gives transformers' logits; without a
  tokenizer, a weights-only (--no-vocab) export of tiny-random-llama runs on token ids.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch

from helpers import DATA
from smedjan.chat import render
from smedjan.data.sources import expand_inputs, iter_chunks
from smedjan.export.gguf import export_gguf
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.model import ModelConfig, Transformer, load_model

GGML_F32 = 0  # ggml_type for type_k / type_v: keep llama.cpp's KV cache in float32

# Perplexity increase over smedjan's float32 forward on held-out text (tinyshakespeare past the
# training prefix), llama.cpp evaluating the quantized file. Why these bounds: q8_0 rounds each
# weight to 1/254 of its block's max (rms noise ~0.2% of a block's scale) and q4_0 to 1/16 of it
# (~16x the noise, ~256x its variance). The loss increase grows with the noise variance, so if
# q4_0 costs a few percent, q8_0 costs well under 0.1%. Measured on this model: q8_0 ~0.0%,
# q4_0 ~+1%; the bounds leave ~10x headroom for other seeds and llama.cpp versions.
PPL_BOUNDS = {"q8_0": 0.01, "q4_0": 0.10}

STRINGS = [
    "Hello world",
    "  leading spaces, trailing   ",
    "line one\nline two\n\n\nthree blank\r\nwindows",
    "tabs\tand\t\tmore\t",
    "don't I'LL we've they'RE it's O'Neil's",
    "12345 3.14159 1,000,000 2024-01-01 007",
    "Ünïcödé façade — naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🎉🚀 and combining e\u0301 and zero\u200bwidth",
    "def f(x):\n    return {'a': [x**2, x // 3]}  # comment\n",
    "<|bos|> and <|assistant_end|> spelled in text",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "",
    " ",
    "\n",
    "a" * 300,
]


@pytest.fixture(scope="module")
def micro(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    return model, tok


@pytest.fixture(scope="module")
def ggufs(trained_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    out = {}
    for q in ("f32", "q8_0", "q4_0"):
        out[q] = d / f"m-{q}.gguf"
        export_gguf(trained_checkpoint, out[q], quant=q)
    return out


def open_llama(path, n_ctx=256, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False,
                           logits_all=True, **kw)


@pytest.fixture(scope="module")
def llm_f32(ggufs):
    return open_llama(ggufs["f32"], type_k=GGML_F32, type_v=GGML_F32)


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def ours_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# ------------------------------------------------------------------------------ tokenizer
def test_tokenization_of_test_strings(llm_f32, micro):
    _, tok = micro
    for text in STRINGS:
        ours = tok.encode(text)
        assert llm_f32.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert llm_f32.tokenize(text.encode(), add_bos=True, special=False) == [tok.bos_id] + ours, text
        assert llm_f32.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, allow_special=True)
        assert llm_f32.detokenize(ours) == text.encode(), text


def test_special_tokens_parse_only_when_asked(llm_f32, micro):
    _, tok = micro
    text = f"{C.USER_START}hi{C.USER_END}"
    with_special = llm_f32.tokenize(text.encode(), add_bos=False, special=True)
    assert with_special[0] == tok.specials[C.USER_START] and with_special[-1] == tok.specials[C.USER_END]
    assert tok.specials[C.USER_START] not in llm_f32.tokenize(text.encode(), add_bos=False, special=False)


def corpus_pieces(files, max_chars: int):
    for f in files:
        for chunk in iter_chunks([f], max_chars=max_chars, txt_split="blank"):
            yield f, chunk.text


def test_tokenization_of_shipped_corpus(llm_f32, micro):
    _, tok = micro
    n = 0
    for f, text in corpus_pieces(expand_inputs([DATA / "pretrain"]), 60_000):
        assert llm_f32.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), f
        n += len(text)
    assert n > 500_000


def test_tokenization_of_shared_corpora(llm_f32, micro, shared_data):
    """Web text, Wikipedia and books: the unicode categories the split regex depends on."""
    _, tok = micro
    files = expand_inputs([shared_data / "pretrain"])
    n = 0
    for f, text in corpus_pieces(files, 40_000):
        assert llm_f32.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), f
        n += len(text)
    assert n > 1_000_000


def test_gpt2_split_tokenizes_like_llama_cpp(shared_data, tmp_path):
    """An imported GPT-2 vocabulary goes out with pre=gpt-2 and tokenizes as llama.cpp does."""
    from smedjan.tokenizer.hf import from_gpt2_files

    d = shared_data / "tokenizer" / "gpt2_hf"
    tok = from_gpt2_files(d / "vocab.json", d / "merges.txt")
    cfg = ModelConfig.make(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=64, preset="custom")
    ck, out = tmp_path / "gpt2.bin", tmp_path / "gpt2.gguf"
    save_checkpoint(ck, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tok)
    export_gguf(ck, out, quant="f32")
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    for f, text in corpus_pieces(expand_inputs([shared_data / "pretrain"]), 20_000):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), f


# ------------------------------------------------------------------------------ forward pass
def test_f32_logits_match(llm_f32, ggufs, micro):
    model, tok = micro
    ids = [tok.bos_id] + tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak.")
    ours = ours_logits(model, ids)
    assert rel_err(ours, llama_logits(llm_f32, ids)) < 1e-5
    # llama.cpp's default f16 KV cache: what users run, still within the 1e-3 the issue asks
    assert rel_err(ours, llama_logits(open_llama(ggufs["f32"], n_ctx=64), ids)) < 1e-3


def greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the model's decode state: one forward per new token."""
    state = model.new_state(1, len(prompt) + n)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), state=state)
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), state=state, start=len(prompt) + len(out) - 1)
    return out


def test_greedy_32_tokens_identical(llm_f32, micro):
    model, tok = micro
    prompt = [tok.bos_id] + tok.encode("ROMEO:\nWhat light")
    ours = greedy_ours(model, prompt, 32)
    llm_f32.reset()
    gen = llm_f32.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    theirs = [next(gen) for _ in range(32)]
    assert theirs == ours, (tok.decode(ours), tok.decode(theirs))
    assert len(set(ours)) > 3  # a real continuation, not one token repeated


# ------------------------------------------------------------------------------ quantization
def heldout_windows(tok, n_windows=12, width=128) -> list[list[int]]:
    text = "".join(c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"]))
    ids = tok.encode(text[1_000_000:1_010_000])  # the fixture trained on the first 400k characters
    step = width - 1
    return [[tok.bos_id] + ids[i:i + step] for i in range(0, step * n_windows, step)]


def mean_nll(logits_of, windows) -> float:
    total = count = 0.0
    for w in windows:
        lp = torch.log_softmax(torch.as_tensor(logits_of(w)), -1)
        total -= lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        count += len(w) - 1
    return total / count


def test_quantized_perplexity_within_bounds(ggufs, micro):
    model, tok = micro
    windows = heldout_windows(tok)
    base = mean_nll(lambda w: ours_logits(model, w), windows)
    increase = {}
    for q in ("q8_0", "q4_0"):
        llm = open_llama(ggufs[q], n_ctx=128, type_k=GGML_F32, type_v=GGML_F32)
        increase[q] = float(np.exp(mean_nll(lambda w: llama_logits(llm, w), windows) - base) - 1)
        assert increase[q] <= PPL_BOUNDS[q], (q, increase, np.exp(base))
    assert increase["q4_0"] > increase["q8_0"]  # quantization is real: 4 bits cost more than 8


# ------------------------------------------------------------------------------ chat template
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?\n  Tell me."}],
])
def test_chat_completion_feeds_our_chat_stream(ggufs, micro, messages):
    _, tok = micro
    llm = open_llama(ggufs["q8_0"], n_ctx=128)
    prompt, resp = chat_prompt(llm, messages)
    assert llm.chat_format == "chat_template.default"  # the embedded template, not a guessed one
    expected = render(tok, messages, add_generation_prompt=True).ids
    assert prompt == expected  # one BOS, specials as ids, message text as plain text
    assert resp["usage"]["prompt_tokens"] == len(expected)


def chat_prompt(llm, messages) -> tuple[list[int], dict]:
    """The token ids llama-cpp-python's chat completion evaluates (seen by a logits processor)."""
    seen: list[list[int]] = []

    def capture(input_ids, scores):
        if not seen:
            seen.append([int(i) for i in input_ids])
        return scores

    resp = llm.create_chat_completion(messages, max_tokens=2, temperature=0.0,
                                      logits_processor=llama_cpp.LogitsProcessorList([capture]))
    return seen[0], resp


def test_special_spellings_in_messages_become_control_tokens_in_llama_cpp(ggufs, micro):
    """A known limit of every string-rendered template (llama.cpp, transformers): the rendered text
    is tokenized with specials parsed, so "<|bos|>" typed by a user becomes BOS there, while
    smedjan's render() keeps it as text. Documented in the README; this pins the behaviour."""
    from smedjan.chat import render_template

    _, tok = micro
    messages = [{"role": "user", "content": "Who are you? <|bos|>"}]
    prompt, _ = chat_prompt(open_llama(ggufs["q8_0"], n_ctx=128), messages)
    assert prompt == tok.encode(render_template(messages, add_generation_prompt=True), allow_special=True)
    assert prompt != render(tok, messages, add_generation_prompt=True).ids


# ------------------------------------------------------------------------------ RoPE, HF input
def sharp_random_model(cfg: ModelConfig, seed=0) -> Transformer:
    """Random weights with large q/k so attention depends strongly on position (RoPE matters)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.wq.weight.mul_(25)
            layer.mixer.wk.weight.mul_(25)
    return model.eval()


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn", "llama3"])
def test_rope_scaling_logits_match(tokenizer, tmp_path, scaling):
    extra = {} if scaling == "none" else {"rope_scaling": scaling, "rope_factor": 4.0,
                                          "rope_original_max_seq_len": 32}
    if scaling == "llama3":
        extra.update(rope_theta=500000.0)
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, preset="custom", **extra)
    model = sharp_random_model(cfg)
    ck, out = tmp_path / "r.bin", tmp_path / "r.gguf"
    save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    export_gguf(ck, out)
    ids = [tokenizer.bos_id] + list(range(300, 400))
    ours = ours_logits(model, ids)
    theirs = llama_logits(open_llama(out, n_ctx=128, type_k=GGML_F32, type_v=GGML_F32), ids)
    assert rel_err(ours, theirs) < 1e-4, scaling
    if scaling != "none":  # the scaling changes the logits by far more than the tolerance
        plain = Transformer(cfg.replace(rope_scaling="none", rope_factor=1.0))
        plain.load_state_dict(model.state_dict())
        assert rel_err(ours, ours_logits(plain.eval(), ids)) > 1e-2


def test_hf_folder_without_tokenizer_runs_on_token_ids(shared_data, tmp_path):
    from smedjan.export.load import load_source

    folder = shared_data / "model" / "tiny-random-llama"
    out = tmp_path / "tiny.gguf"
    export_gguf(folder, out, quant="f32", no_vocab=True)
    src = load_source(folder)
    with torch.device("meta"):
        model = Transformer(src.config)
    model = model.to_empty(device="cpu")
    model.load_state_dict(src.tensors)
    ids = [1, 450, 4996, 17354, 1701, 432, 31999, 0, 2]
    llm = llama_cpp.Llama(str(out), n_ctx=32, n_threads=2, verbose=False, logits_all=True, type_k=GGML_F32,
                          type_v=GGML_F32)
    assert llm.n_vocab() == 32000
    assert rel_err(ours_logits(model.eval(), ids), llama_logits(llm, ids)) < 1e-4


def test_hf_folder_with_tokenizer_json_exports_like_its_checkpoint(trained_checkpoint, ggufs, tmp_path):
    """export-hf, then export-gguf of that folder: its tokenizer.json is picked up and the GGUF
    holds the same tokenizer and the same tensor bytes as the checkpoint's own export."""
    from gguf import GGUFReader

    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source

    export_hf(load_source(trained_checkpoint), tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "from-hf.gguf", quant="q4_0")
    export_gguf(trained_checkpoint, tmp_path / "from-ck.gguf", quant="q4_0")
    a, b = GGUFReader(tmp_path / "from-hf.gguf"), GGUFReader(tmp_path / "from-ck.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    assert [(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in a.tensors] == \
        [(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in b.tensors]


def test_hf_folder_with_tokenizer_flag_matches_transformers(tokenizer, tokenizer_path, tmp_path):
    """An outside HF Llama (untied, GQA, head_dim != hidden/heads) plus our tokenizer of its
    vocabulary size: llama.cpp runs the GGUF with transformers' logits and our tokenization."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    hf.save_pretrained(tmp_path / "hf")
    summary = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", quant="f32", tokenizer=tokenizer_path)
    assert summary["tokenizer"] == tokenizer.fingerprint
    llm = open_llama(tmp_path / "m.gguf", n_ctx=64, type_k=GGML_F32, type_v=GGML_F32)
    text = "Outside weights, our tokenizer."
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    assert ids == [tokenizer.bos_id] + tokenizer.encode(text)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].double().numpy()
    assert rel_err(theirs, llama_logits(llm, ids)) < 1e-4
