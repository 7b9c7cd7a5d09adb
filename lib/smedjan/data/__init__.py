"""Corpus reading (`sources`) and the training data loader (`loader`).

    from smedjan.data.sources import iter_chunks
    for chunk in iter_chunks(["corpus.txt", "web.jsonl.zst"]):
        print(chunk.new_doc, len(chunk.text))
"""
