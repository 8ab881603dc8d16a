"""Checks of a component inside a tiny GPT: cached generation, training, reproducible initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...model.generate import generate
from ...spec import MODEL_SLOTS
from ..subject import CheckSkipped, Subject
from .registry import _attention_declares, _expect_close, conformance_check


# -- whole models ----------------------------------------------------------------------------
@conformance_check("generate_cached", "a tiny GPT decoding with its KV cache gives the full pass's logits and "
                   "the same greedy tokens", {"attention", "block", "positional"},
                   when=_attention_declares("kv_cache"), for_lm=True)
def check_generate_cached(s: Subject) -> None:
    model = s.tiny_gpt().eval()
    if not model.supports_kv_cache:
        raise CheckSkipped(f"the model's attention '{model.spec.attention.name}' has no KV cache")
    idx = torch.randint(0, model.spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(s.device)
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(idx)
        stepped = torch.cat([model(idx[:, :3], kv_cache=cache)] +
                            [model(idx[:, t:t + 1], kv_cache=cache) for t in range(3, 8)], dim=1)
    _expect_close(s, stepped, full, "a GPT's logits decoded one token at a time with its KV cache")
    cached = generate(model, idx[:, :3], 10, use_cache=True)
    uncached = generate(model, idx[:, :3], 10, use_cache=False)
    if not torch.equal(cached, uncached):
        at = int((cached != uncached).any(0).nonzero()[0])
        raise s.fail(f"greedy generation with the KV cache first differs from without it at token {at}")


@conformance_check("trains", "a tiny GPT using it lowers its loss over 20 steps on a fixed batch",
                   MODEL_SLOTS, for_lm=True)
def check_trains(s: Subject) -> None:
    model = s.tiny_gpt().train()
    spec = model.spec
    batch = torch.randint(0, spec.vocab_size, (4, spec.context_length + 1), generator=torch.Generator().manual_seed(4))
    batch = batch.to(s.device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses):
        raise s.fail(f"training loss became non-finite: {losses}")
    if not losses[-1] < 0.9 * losses[0]:
        raise s.fail(f"a tiny GPT using it did not learn a fixed batch: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                     f"over 20 AdamW steps (expected at least a 10% drop)")


@conformance_check("init_reproducible", "the same seed gives the same finite weights; another seed others", {"init"})
def check_init_reproducible(s: Subject) -> None:
    a, b, c = (s.tiny_gpt(seed=seed).state_dict() for seed in (0, 0, 1))
    for name, tensor in a.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise s.fail(f"'{name}' has NaN or inf after initialisation")
        if not torch.equal(tensor, b[name]):
            raise s.fail(f"'{name}' differs between two builds with the same seed")
    if all(torch.equal(a[k], c[k]) for k in a):
        raise s.fail("two different seeds give identical weights")
