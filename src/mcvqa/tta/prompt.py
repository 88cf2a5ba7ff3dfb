"""TPT: test-time tuning of a soft prompt, per question, everything else frozen."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mcvqa.engine import Scored
from mcvqa.errors import McvqaError
from mcvqa.features import Example, Loaded
from mcvqa.families import core_and_head
from mcvqa.scoring import Scorer, entropy
from mcvqa.tta.views import ADAPT_VIEWS, select_confident, view_examples


class SoftPrompt:
    """``k`` learnable embeddings placed at the start of the question, through a placeholder token.

    A forward hook on the token embedding swaps the placeholder rows for the learnable vectors, so the rest of the
    pipeline (prefix cache, images, positions) is untouched and everything else stays frozen.
    """

    def __init__(self, scorer: Scorer, k: int = 4, init_text: str = "사진을 잘 보고") -> None:
        self.scorer = scorer
        tok = scorer.encoder.tokenizer
        self.placeholder = soft_prompt_token(tok)
        core, _ = core_and_head(scorer.model)
        self.embed = core.language_model.get_input_embeddings()
        init_ids = tok.encode(init_text, add_special_tokens=False)[:k] or [self.placeholder]
        while len(init_ids) < k:
            init_ids.append(init_ids[-1])
        with torch.no_grad():
            # The embedding module's output, not its weight rows: Gemma scales embeddings by sqrt(hidden).
            init = self.embed(torch.tensor([init_ids], device=self.embed.weight.device))[0].detach().clone().float()
        self.init = init
        self.vectors = torch.nn.Parameter(init.clone())
        self.k = k
        self.handle = self.embed.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        mask = ids == self.placeholder
        if not bool(mask.any()):
            return output
        out = output.clone()
        n_rows = int(mask.sum()) // self.k
        out[mask] = self.vectors.to(out.dtype).repeat(n_rows, 1)
        return out

    def reset(self) -> None:
        with torch.no_grad():
            self.vectors.copy_(self.init)

    def attach(self, ex: Example) -> Example:
        ex.question_ids = [self.placeholder] * self.k + ex.question_ids
        return ex

    def close(self) -> None:
        self.handle.remove()


SOFT_PROMPT_TOKENS = ("<|box_start|>", "<unused0>", "<|reserved_special_token_0|>", "<quad>")
"""Tokens that never occur in a question, one of which every supported tokenizer has (Qwen's box marker; Gemma's
unused pieces; InternVL's quad marker)."""


def soft_prompt_token(tokenizer: Any) -> int:
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in SOFT_PROMPT_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk and tokenizer.convert_ids_to_tokens(tid) == token:
            return tid
    raise McvqaError(f"test-time prompt tuning needs a reserved token the questions never contain; this tokenizer has none of {', '.join(SOFT_PROMPT_TOKENS)}")


def tpt_batch(
    scorer: Scorer, questions: Sequence[Loaded], k: int = 4, lr: float = 5e-3, select: float = 0.3, views: Sequence[str] = ADAPT_VIEWS,
) -> Scored:
    """TPT (Shu et al. 2022): per question, one step on a soft prompt minimising the entropy of the averaged
    prediction over its most confident views; predict the original view with the tuned prompt; reset."""
    sp = SoftPrompt(scorer, k)
    enc = scorer.encoder
    flags = {n: p.requires_grad for n, p in scorer.model.named_parameters()}
    for p in scorer.model.parameters():
        p.requires_grad_(False)
    out = np.zeros((len(questions), 4))
    try:
        for i, q in enumerate(questions):
            opt = torch.optim.AdamW([sp.vectors], lr=lr)
            exs = [sp.attach(e) for e in view_examples(enc, q, views)]
            lp = scorer.logprobs(enc.collate(exs), grad=True, prefix_grad=False)  # the prompt sits after the cached prefix
            keep = select_confident(lp.detach(), select)
            avg = torch.logsumexp(lp[keep], dim=0) - math.log(len(keep))
            loss = entropy(avg[None]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                final = scorer.logprobs(enc.collate(exs[:1]))
            out[i] = final[0].exp().double().cpu().numpy()
            sp.reset()
    finally:
        sp.close()
        for n, p in scorer.model.named_parameters():
            p.requires_grad_(flags[n])
    return Scored(out / out.sum(-1, keepdims=True))
