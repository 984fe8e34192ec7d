"""`hibari demo` step 6: load an exported Hugging Face directory with plain `transformers` and continue prompts."""

from __future__ import annotations

from pathlib import Path


def generate(hf_dir: Path, prompts: list[str], max_new_tokens: int, desc: str = "generate") -> list[str]:
    """Load an HF directory with plain `transformers` (as a user would) and continue each prompt greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hibari.progress import progress_bar

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    outs = []
    with progress_bar(total=len(prompts), desc=desc, unit="prompt") as bar:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            # seeded top-k sampling: a model this small, trained this briefly, loops on "。" when decoding greedily
            torch.manual_seed(1234)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40,
                                     temperature=0.8, repetition_penalty=1.2,
                                     pad_token_id=tokenizer.eos_token_id)
            outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            bar.advance(1)
    return outs

