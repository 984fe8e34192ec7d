"""SentencePiece tokenizer training, Swallow-style vocabulary expansion, and the encoder used to tokenize corpora."""
