"""Corpus shards -> Megatron `.bin`/`.idx` token files (`hibari data tokenize`). Reader: `megatron_ext.data`."""
