"""Common Crawl WARC -> cleaned Japanese corpus (Swallow recipe).

Corpus record schema (one JSON object per line in JSONL.zst shards, shared by clean, dedup and tokenize):
    id        WARC-Record-ID of the response record (str, unique)
    text      cleaned document text (str)
    url       WARC-Target-URI (str)
    host      lower-cased host name of url (str)
    date      WARC-Date as an ISO-8601 string (str; "" when the record had none or an invalid one)
    snapshot  crawl/snapshot name, e.g. "CC-MAIN-2023-23" (str)
    warc_file name of the source WARC file (str)
Extra keys (e.g. "features") may follow; readers ignore keys they do not know.
"""
