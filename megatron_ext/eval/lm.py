"""`HibariLM`: an lm-evaluation-harness model around a live hibari model object (any `tokens -> logits` module).

It scores the way the harness's own Hugging Face backend (`lm_eval --model hf`) scores a causal LM, so the numbers
of a hibari checkpoint and of its HF export agree: the same tokenization rules (TemplateLM's context/continuation
split, BOS as the prefix of an empty context), left truncation to the model's context length, log-softmax in
float32 over the continuation positions. The model is called on right-padded batches; causal attention makes the
padding invisible to the real positions. This module imports lm_eval at import time: import it through
`megatron_ext.eval.harness.build_lm`, which turns a missing package into a one-line error.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hibari.progress import progress_bar

GENERATE_MAX_TOKENS = 256  # the HF backend's default for tasks that do not set max_gen_toks


class HibariLM(TemplateLM):
    """lm_eval model: `logits_fn(tokens [batch, seq] long) -> logits [batch, seq, vocab]` plus an HF tokenizer.

    `HibariLM.from_module(model, tokenizer)` wraps a hibari `Transformer` (or anything called as `model(tokens)`).
    """

    backend = "causal"

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], tokenizer, max_length: int,
                 vocab_size: int, device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._logits_fn = logits_fn
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.vocab_size = vocab_size
        self._device = torch.device(device)  # LM.device (a read-only property) returns it
        self.batch_size = batch_size
        self.progress = progress

    @classmethod
    def from_module(cls, model: torch.nn.Module, tokenizer, max_length: int | None = None, batch_size: int = 8,
                    progress: bool = True) -> "HibariLM":
        args = model.args
        device = next(model.parameters()).device

        def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(tokens)

        return cls(logits_fn, tokenizer, max_length=max_length or args.max_seq_len, vocab_size=args.vocab_size,
                   device=device, batch_size=batch_size, progress=progress)

    # ---------------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False  # the text already starts with BOS (a few-shot prompt template)
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------- scoring
    def _log_probs(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in batch)
        tokens = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            tokens[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        logits = self._logits_fn(tokens.to(self._device))
        return F.log_softmax(logits[..., :self.vocab_size].float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy decode) for each request."""
        # longest first: batches of similar length pad little, and a too-long input fails at the start
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with progress_bar(total=len(requests), desc="eval loglikelihood", unit="req",
                          enabled=self.progress and not disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                inputs, conts = [], []
                for i in chunk:
                    _, context_enc, continuation_enc = requests[i]
                    if not context_enc or not continuation_enc:
                        raise ValueError("empty context or continuation after tokenization")
                    # the last token is only a target; over-long inputs lose tokens on the left
                    inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                    conts.append(continuation_enc)
                log_probs = self._log_probs(inputs)
                for row, i, inp, cont in zip(log_probs, chunk, inputs, conts):
                    scored = row[len(inp) - len(cont):len(inp)]  # positions that predict the continuation
                    target = torch.tensor(cont, dtype=torch.long)
                    logprob = float(scored.gather(-1, target.unsqueeze(-1)).sum())
                    greedy = bool((scored.argmax(dim=-1) == target).all())
                    out[i] = (logprob, greedy)
                    request_str = requests[i][0]
                    if request_str is not None and request_str[0] is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, (logprob, greedy))
                bar.advance(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), scored in disjoint windows of the context length."""
        scores = []
        for (text,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,  # as the HF backend
                max_seq_len=self.max_length, context_len=1)]
            results = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            score = sum(logprob for logprob, _ in results)
            scores.append(score)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string or `max_gen_toks` (no KV cache: each token re-reads the prefix)."""
        results = []
        with progress_bar(total=len(requests), desc="eval generate", unit="req",
                          enabled=self.progress and not disable_tqdm) as bar:
            for request in requests:
                context, gen_kwargs = request.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos_text = self.tok_decode([self.eot_token_id])
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_new = int(gen_kwargs.pop("max_gen_toks", GENERATE_MAX_TOKENS))
                tokens = self.tok_encode(context)
                if self.max_length > max_new:  # leave room for the answer, as the HF backend does
                    tokens = tokens[-(self.max_length - max_new):]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    window = (tokens + new)[-self.max_length:]
                    next_token = int(self._log_probs([window])[0, -1].argmax())
                    if next_token == self.eot_token_id:
                        break
                    new.append(next_token)
                    text = self.tok_decode(new)
                    if any(stop and stop in text for stop in until):
                        break
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
                bar.advance(1)
        return results
